// The API client: same origin as the dashboard, user tokens (JWT) from /v1/auth/login.

const TOKEN = "wrenn.token";

/** The signed-in person, their teams and the current team. */
export const session = $state({
  token: localStorage.getItem(TOKEN) || "",
  me: null,
  teams: [],
});

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (session.token) h.Authorization = `Bearer ${session.token}`;
  return h;
}

async function failure(res) {
  let code = "http_" + res.status;
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body?.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    } else if (body?.message) {
      message = body.message;
    }
  } catch (_) {
    /* not JSON: keep the status line */
  }
  if (res.status === 401 && session.token) signOut();
  return new ApiError(res.status, code, message);
}

/** Calls the API; resolves to the JSON body (or null), rejects with an ApiError. */
export async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "network", `cannot reach the server: ${e.message}`);
  }
  if (!res.ok) throw await failure(res);
  if (res.status === 204) return null;
  const type = res.headers.get("content-type") || "";
  return type.includes("json") ? res.json() : res.blob();
}

export const get = (p) => api("GET", p);
export const post = (p, b) => api("POST", p, b ?? {});
export const del = (p) => api("DELETE", p);

/** Uploads one file with progress (fetch cannot report upload progress). */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const x = new XMLHttpRequest();
    x.open("POST", path);
    if (session.token) x.setRequestHeader("Authorization", `Bearer ${session.token}`);
    x.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    x.onerror = () => reject(new ApiError(0, "network", "upload failed: connection lost"));
    x.onload = () => {
      if (x.status >= 200 && x.status < 300) return resolve();
      let message = `${x.status} ${x.statusText}`;
      try {
        message = JSON.parse(x.responseText).error.message || message;
      } catch (_) {}
      reject(new ApiError(x.status, "upload", message));
    };
    x.send(form);
  });
}

export async function signIn(email, password) {
  const r = await post("/v1/auth/login", { email, password });
  setToken(r.token);
  await loadSession();
}

export async function switchTeam(teamId) {
  const r = await post("/v1/auth/switch-team", { team_id: teamId });
  setToken(r.token);
  await loadSession();
}

export function signOut() {
  setToken("");
  session.me = null;
  session.teams = [];
}

function setToken(t) {
  session.token = t;
  if (t) localStorage.setItem(TOKEN, t);
  else localStorage.removeItem(TOKEN);
}

export async function loadSession() {
  const [me, teams] = await Promise.all([get("/v1/me"), get("/v1/teams")]);
  session.me = me;
  session.teams = teams;
}

/**
 * The team's live events (server-sent events read through fetch, so the token goes in
 * a header). Reconnects with backoff; returns a function that stops it.
 */
export function subscribe(onEvent) {
  let stopped = false;
  let ctl = null;
  let delay = 500;
  (async () => {
    while (!stopped) {
      ctl = new AbortController();
      try {
        const res = await fetch("/v1/events/stream", { headers: headers(), signal: ctl.signal });
        if (!res.ok) throw await failure(res);
        delay = 500;
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const frame = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            const data = frame
              .split("\n")
              .filter((l) => l.startsWith("data:"))
              .map((l) => l.slice(5).trimStart())
              .join("\n");
            if (!data) continue;
            try {
              onEvent(JSON.parse(data));
            } catch (_) {
              /* a frame that is not an event */
            }
          }
        }
      } catch (e) {
        if (stopped || e.status === 401) return;
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return () => {
    stopped = true;
    ctl?.abort();
  };
}

export function fmtBytes(n) {
  if (n == null) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n < 10 && i ? n.toFixed(1) : Math.round(n)} ${u[i]}`;
}

export function age(iso) {
  if (!iso) return "—";
  const s = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");

/** The latest live event; pages watch `live.seq` and reload what it concerns. */
export const live = $state({ seq: 0, event: null, connected: false });
