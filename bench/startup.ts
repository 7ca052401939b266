/**
 * `deno task bench startup`: how long `mpq --version` takes against a bare `deno run` of a
 * one-line script (what the runtime itself costs), interleaved, medians of 31 runs each; also the
 * bundled single file (dist/mpq) when it was built. Target (issue 9): within 1.2x of the bare run.
 * @module
 */

const RUNS = 31;

function deno(): string {
  return Deno.execPath();
}

/** Wall time of one run of `cmd` in ms (output discarded). */
async function once(cmd: string[]): Promise<number> {
  const t0 = performance.now();
  const out = await new Deno.Command(cmd[0], { args: cmd.slice(1), stdout: "null", stderr: "null" }).output();
  const ms = performance.now() - t0;
  if (!out.success) throw new Error(`${cmd.join(" ")} exited ${out.code}`);
  return ms;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

/** Runs the start-up benchmark and prints its table. */
export async function benchStartup(): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "mpq-bench-startup-" });
  try {
    const bare = `${dir}/one.ts`;
    await Deno.writeTextFile(bare, 'console.log("mpq 0.0.0");\n');
    const main = new URL("../main.ts", import.meta.url).pathname;
    const cases: Array<[string, string[]]> = [
      ["bare deno run (one line)", [deno(), "run", "-A", bare]],
      ["mpq --version (deno run main.ts)", [deno(), "run", "-A", main, "--version"]],
    ];
    const dist = new URL("../dist/mpq", import.meta.url).pathname;
    try {
      if (Deno.statSync(dist).isFile) cases.push(["dist/mpq --version (single file)", [dist, "--version"]]);
    } catch {
      console.log("(dist/mpq not built: `deno task compile` adds the single file to this table)");
    }
    const times = cases.map(() => [] as number[]);
    for (const [, cmd] of cases) await once(cmd); // warm the module cache
    for (let r = 0; r < RUNS; r++) {
      for (let c = 0; c < cases.length; c++) times[c].push(await once(cases[c][1]));
    }
    const base = median(times[0]);
    console.log(`start-up, median of ${RUNS} interleaved runs`);
    console.log(`${"command".padEnd(36)} ${"median".padStart(9)} ${"vs bare".padStart(8)}`);
    cases.forEach(([name], c) => {
      const m = median(times[c]);
      console.log(`${name.padEnd(36)} ${m.toFixed(1).padStart(6)} ms ${(m / base).toFixed(2).padStart(7)}x`);
    });
    const ratio = median(times[1]) / base;
    console.log(
      `target mpq --version <= 1.2x bare: ${ratio <= 1.2 ? "met" : "missed"} (${ratio.toFixed(2)}x)`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
