// Hash routes (#/capsules/cl-…): the server serves one page, and API paths never
// collide with the dashboard's.
function parse() {
  const h = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = h.split("?");
  return { parts: path ? path.split("/").map(decodeURIComponent) : [], query: new URLSearchParams(query) };
}

export const route = $state(parse());

addEventListener("hashchange", () => Object.assign(route, parse()));

export function go(path) {
  location.hash = "#/" + path.replace(/^\//, "");
}
