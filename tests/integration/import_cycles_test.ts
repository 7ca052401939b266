/**
 * The code has no import cycles (STYLE.md rule 15): every static import (types included) between
 * modules of main.ts, ffi/ and lib/ forms a DAG.
 */
import assert from "node:assert/strict";

const ROOT = new URL("../../", import.meta.url).pathname;

function sources(dir: string, out: string[] = []): string[] {
  for (const e of Deno.readDirSync(`${ROOT}${dir}`)) {
    const rel = `${dir}/${e.name}`;
    if (e.isDirectory) sources(rel, out);
    else if (e.name.endsWith(".ts") && !e.name.endsWith("_test.ts")) out.push(rel);
  }
  return out;
}

function imports(file: string): string[] {
  const text = Deno.readTextFileSync(`${ROOT}${file}`);
  const out: string[] = [];
  // `import ... from "./x.ts"`, `export ... from "./x.ts"` (static only: dynamic import() is lazy).
  for (const m of text.matchAll(/^(?:import|export)\b[^;]*?\bfrom\s+"(\.[^"]+)"/gms)) {
    const url = new URL(m[1], `file://${ROOT}${file}`);
    out.push(url.pathname.slice(ROOT.length));
  }
  return out;
}

Deno.test("imports between modules form no cycle", () => {
  const files = ["main.ts", ...sources("ffi"), ...sources("lib")];
  const graph = new Map(files.map((f) => [f, imports(f)]));
  const state = new Map<string, "visiting" | "done">();
  const cycles: string[] = [];
  const visit = (f: string, path: string[]) => {
    if (state.get(f) === "done") return;
    if (state.get(f) === "visiting") {
      cycles.push([...path.slice(path.indexOf(f)), f].join(" -> "));
      return;
    }
    state.set(f, "visiting");
    for (const g of graph.get(f) ?? []) visit(g, [...path, f]);
    state.set(f, "done");
  };
  for (const f of files) visit(f, []);
  assert.ok(graph.size > 50, `read the modules (${graph.size})`);
  assert.deepEqual(cycles, [], `import cycles:\n${cycles.join("\n")}`);
});
