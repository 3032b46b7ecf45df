// The Label page's keys: 1-9 and 0 for the first ten classes, n for none of these, s to skip.
// Each key presses the answer button that carries it; without this script the buttons work alone.
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.target.closest("input, select, textarea")) {
    return;
  }
  const button = document.querySelector(`.label-answers button[data-key="${CSS.escape(event.key)}"]`);
  if (button) {
    event.preventDefault();
    button.click();
  }
});
