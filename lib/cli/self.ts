/**
 * How to run mpq itself again (daemonizing, children such as `mpq vhost` under orchestrate).
 * @module
 */

/**
 * The argv prefix that starts this same mpq: the single-file launcher sets MPQ_SELF; a
 * `deno compile` binary is its own executable; from source it is `deno run -A main.ts`.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { spawn } from "../../ffi/mod.ts";
 *
 * const [exe, ...pre] = selfCommand(); // from source: [deno, "run", "-A", "--quiet", ".../main.ts"]
 * const child = spawn(exe, [exe, ...pre, "--version"], { stdio: "null" });
 * assert.equal((await child.wait()).code, 0);
 * ```
 */
export function selfCommand(): string[] {
  const launcher = Deno.env.get("MPQ_SELF");
  if (launcher) return [launcher];
  const main = new URL("../../main.ts", import.meta.url);
  if (main.protocol === "file:") {
    try {
      Deno.statSync(main);
      return [Deno.execPath(), "run", "-A", "--quiet", main.pathname];
    } catch { /* bundled or compiled: fall through */ }
  }
  return [Deno.execPath()];
}
