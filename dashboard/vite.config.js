import { defineConfig } from "vite";
import { svelte } from "@sveltejs/vite-plugin-svelte";

// `npm run dev` proxies the API to a local `wrenn serve` (WRENN_URL, default :8080).
const api = process.env.WRENN_URL || "http://127.0.0.1:8080";

export default defineConfig({
  plugins: [svelte()],
  base: "/",
  build: {
    outDir: "dist",
    assetsDir: "assets",
    target: "es2022",
    // The first page stays small: the terminal (xterm.js) is its own chunk, loaded
    // when a terminal opens.
    chunkSizeWarningLimit: 400,
  },
  server: {
    proxy: { "/v1": { target: api, ws: true, changeOrigin: false } },
  },
});
