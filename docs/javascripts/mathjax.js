// MathJax 3 settings, read by assets/mathjax/tex-svg.js (served with the site, so formulas render
// offline). pymdownx.arithmatex wraps each $...$ and $$...$$ of a page in an element of class
// "arithmatex" with \( \) or \[ \] delimiters: typeset those and nothing else (code stays code).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*",
    processHtmlClass: "arithmatex",
  },
  svg: { fontCache: "global" },
};
