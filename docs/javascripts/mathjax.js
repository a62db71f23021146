// MathJax 3 configuration, read by assets/mathjax/tex-chtml-full.js (loaded after this file).
// Two kinds of pages hold math:
// - Markdown pages: pymdownx.arithmatex (generic) wraps each formula in a span.arithmatex,
//   written \( \) or \[ \];
// - notebook pages (mkdocs-jupyter): the cells' Markdown keeps $ $ and $$ $$, inside
//   div.jupyter-wrapper.
// Everything else in the content (class md-typeset) is left alone, so a dollar sign in prose
// never starts a formula; code and preformatted outputs are skipped by MathJax's defaults, and
// so is the hidden copy of each code cell that the notebook's copy button copies.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: "md-typeset|clipboard-copy-txt",
    processHtmlClass: "arithmatex|jupyter-wrapper",
  },
};
