import { mount } from "svelte";
import "./app.css";
import App from "./App.svelte";

const app = mount(App, { target: document.getElementById("app") });
// Browser tests read this mark to measure time to interactive.
performance.mark("wrenn:interactive");
export default app;
