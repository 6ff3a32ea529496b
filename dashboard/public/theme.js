// The theme is chosen before the first paint (no flash of the other one).
try {
  const t = localStorage.getItem("wrenn.theme");
  document.documentElement.dataset.theme =
    t || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
} catch (_) {}
