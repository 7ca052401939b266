/**
 * `deno task fuzz vhost`: fuzzes `mpq vhost blk` and `mpq vhost rng` daemons over a real UNIX
 * socket (see fuzz/vhost/runner.ts for what is checked after each case).
 * @module
 */
import { parseArgs } from "node:util";
import { FUZZ_DEVICES } from "./vhost/layout.ts";
import { minimizeCase } from "./vhost/minimize.ts";
import { distinctFailures, formatFigures, type FuzzOptions, runVhostFuzz } from "./vhost/runner.ts";
import {
  CASE_KINDS,
  type CaseKind,
  type CasePlan,
  describePlan,
  planFromJson,
  planToJson,
} from "./vhost/steps.ts";

/** Usage of `deno task fuzz vhost`. */
export const USAGE = `Usage: deno task fuzz vhost [options]

Drives real \`mpq vhost blk\` and \`mpq vhost rng\` daemons with random, mutated and replayed
vhost-user messages, wrong fds, memory tables changed under running queues and corrupted rings.
After each case the daemon must be alive, answer a probe, hold no more fds or shared mappings
than after its first clean session, and (every K cases) serve verified I/O.

  --messages=N        messages to send in all (default 100000)
  --rings=N           ring states to try in all (default 10000)
  --seed=S            run seed, 0..4294967295 (default: random, printed)
  --device=D          blk, rng or all (default all: the budgets are split)
  --max-seconds=S     start no new case after S seconds (0: no limit, the default)
  --case=N|A-B        run only case N (or cases A to B) of the seed: a replay
  --kinds=K,...       case families: ${CASE_KINDS.join(", ")} (default all)
  --verify-every=K    verified I/O by a well-behaved front-end every K cases (default 50)
  --timeout-ms=T      a probe not answered within T ms is a hang (default 10000)
  --stall-ms=T        a probe answered after more than T ms is a stall (default 2000)
  --settle-ms=T       time fds and mappings over the baseline may take to go (default 1000)
  --engine=E          blk I/O engine passed to the daemon (auto, uring, vmcopy, preadv)
  --mpq=PATH          fuzz this mpq executable (e.g. dist/mpq) instead of this checkout's
  --keep=DIR          where to write failures.txt and the daemon logs (default: a temp dir,
                      made only when something fails)
  --keep-logs         keep the daemon logs even when nothing failed
  --max-reports=N     full failure reports printed (default 20; all go to failures.txt)
  --print-plans       print every case's steps before running it
  --minimize          with --case=N or --plan-file: shrink the failing case to a minimal one
                      (fresh daemon per attempt), print it and save it as a plan file
  --plan-file=F       run the case saved in F (written by --minimize)
  --progress=S        a progress line every S seconds (default 10, 0: none)
  -h, --help          this text

Exit status 1 when anything failed. A failure prints the command that replays its case.`;

function int(name: string, v: string | undefined, def: number, min: number, max: number): number {
  if (v === undefined) return def;
  const n = Number(v);
  if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new Error(`--${name} must be an integer in ${min}..${max}: got ${JSON.stringify(v)}`);
  }
  return n;
}

/** Parses the arguments into runner options. */
export function parseFuzzArgs(
  args: string[],
  out: (l: string) => void,
): (FuzzOptions & { minimize: boolean }) | "help" {
  const { values: v } = parseArgs({
    args,
    strict: true,
    allowPositionals: false,
    options: {
      messages: { type: "string" },
      rings: { type: "string" },
      seed: { type: "string" },
      device: { type: "string" },
      case: { type: "string" },
      "max-seconds": { type: "string" },
      kinds: { type: "string" },
      "verify-every": { type: "string" },
      "timeout-ms": { type: "string" },
      "stall-ms": { type: "string" },
      "settle-ms": { type: "string" },
      engine: { type: "string" },
      mpq: { type: "string" },
      keep: { type: "string" },
      "keep-logs": { type: "boolean" },
      "max-reports": { type: "string" },
      "print-plans": { type: "boolean" },
      minimize: { type: "boolean" },
      "plan-file": { type: "string" },
      progress: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (v.help) return "help";
  const device = v.device ?? "all";
  if (device !== "all" && !FUZZ_DEVICES.includes(device as never)) {
    throw new Error(`--device must be blk, rng or all: got ${JSON.stringify(device)}`);
  }
  const kinds = (v.kinds ?? CASE_KINDS.join(",")).split(",").filter((k) => k !== "");
  for (const k of kinds) {
    if (!CASE_KINDS.includes(k as CaseKind)) {
      throw new Error(
        `--kinds: unknown family ${JSON.stringify(k)}: expected some of ${CASE_KINDS.join(", ")}`,
      );
    }
  }
  if (kinds.length === 0) throw new Error("--kinds must name at least one family");
  let cases: FuzzOptions["cases"];
  if (v.case !== undefined) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(v.case);
    if (!m || (m[2] !== undefined && Number(m[2]) < Number(m[1]))) {
      throw new Error(`--case must be N or A-B with A <= B: got ${JSON.stringify(v.case)}`);
    }
    cases = { first: Number(m[1]), last: Number(m[2] ?? m[1]) };
  }
  const engine = v.engine;
  if (engine !== undefined && !["auto", "uring", "vmcopy", "preadv"].includes(engine)) {
    throw new Error(`--engine must be auto, uring, vmcopy or preadv: got ${JSON.stringify(engine)}`);
  }
  const seed = v.seed === undefined
    ? Math.floor(Math.random() * 2 ** 32)
    : int("seed", v.seed, 0, 0, 2 ** 32 - 1);
  let plan: CasePlan | undefined;
  if (v["plan-file"] !== undefined) {
    try {
      plan = planFromJson(Deno.readTextFileSync(v["plan-file"]));
    } catch (e) {
      throw new Error(`--plan-file ${v["plan-file"]}: ${(e as Error).message}`);
    }
    if (cases) throw new Error("--plan-file and --case are exclusive");
  }
  if (v.minimize && !plan && !(cases && cases.first === cases.last)) {
    throw new Error("--minimize needs one case: --case=N (with its --seed) or --plan-file=F");
  }
  const replayArgs: string[] = [];
  if (v.kinds !== undefined) replayArgs.push(`--kinds=${kinds.join(",")}`);
  if (engine !== undefined) replayArgs.push(`--engine=${engine}`);
  if (v.mpq !== undefined) {
    if (!Deno.statSync(v.mpq).isFile) throw new Error(`--mpq ${v.mpq}: not a file`);
    replayArgs.push(`--mpq=${v.mpq}`);
    // How mpq finds itself (lib/cli/self.ts): the daemons are started from this executable.
    Deno.env.set("MPQ_SELF", v.mpq);
  }
  return {
    devices: device === "all" ? FUZZ_DEVICES : [device as "blk" | "rng"],
    messages: int("messages", v.messages, 100_000, 0, 1e9),
    rings: int("rings", v.rings, 10_000, 0, 1e9),
    seed,
    cases,
    kinds: kinds as CaseKind[],
    verifyEvery: int("verify-every", v["verify-every"], 50, 0, 1e9),
    timeoutMs: int("timeout-ms", v["timeout-ms"], 10_000, 100, 600_000),
    stallMs: int("stall-ms", v["stall-ms"], 2000, 1, 600_000),
    settleMs: int("settle-ms", v["settle-ms"], 1000, 0, 600_000),
    blkArgs: engine ? [`--engine=${engine}`] : [],
    replayArgs,
    keepDir: v.keep,
    keepLogs: v["keep-logs"] ?? false,
    maxReports: int("max-reports", v["max-reports"], 20, 0, 1e9),
    printPlans: v["print-plans"] ?? false,
    plan,
    planFile: v["plan-file"],
    minimize: v.minimize ?? false,
    progressSeconds: int("progress", v.progress, 10, 0, 1e6),
    maxSeconds: int("max-seconds", v["max-seconds"], 0, 0, 1e9),
    out,
  };
}

/**
 * `deno task fuzz vhost ...`; returns the exit code.
 * @example
 * const code = await fuzzVhost(["--device=blk", "--messages=2000", "--rings=200", "--seed=1"]);
 */
export async function fuzzVhost(args: string[]): Promise<number> {
  const out = (l: string) => console.log(l);
  let o;
  try {
    o = parseFuzzArgs(args, out);
  } catch (e) {
    console.error(`fuzz vhost: ${(e as Error).message}\n\n${USAGE}`);
    return 2;
  }
  if (o === "help") {
    console.log(USAGE);
    return 0;
  }
  if (o.minimize) return await minimize(o);
  const abort = new AbortController();
  const onInt = () => {
    out("fuzz vhost: interrupted, finishing the current case");
    abort.abort();
  };
  Deno.addSignalListener("SIGINT", onInt);
  try {
    out(
      o.plan
        ? `vhost fuzz: ${o.planFile} (${o.plan.device}, ${o.plan.steps.length} steps: ${o.plan.tag})`
        : `vhost fuzz: seed ${o.seed}, devices ${o.devices.join(", ")}, ${
          o.cases
            ? `cases ${o.cases.first}-${o.cases.last}`
            : `${o.messages} messages and ${o.rings} ring states`
        }, families ${o.kinds.join(", ")}`,
    );
    const r = await runVhostFuzz({ ...o, signal: abort.signal });
    out("");
    for (const [d, f] of Object.entries(r.byDevice)) out(formatFigures(f, d));
    out(formatFigures(r.figures, "total"));
    const distinct = distinctFailures(r.failures);
    if (distinct.length > 0) {
      out(`\n${r.failures.length} failure(s), ${distinct.length} distinct:`);
      for (const { first, count } of distinct) {
        out(`  ${count} x ${first.kind}: ${first.summary}`);
        if (first.replay) out(`      first: ${first.replay}`);
      }
    }
    if (r.artefacts) out(`\nreports and daemon logs kept in ${r.artefacts}`);
    if (r.error) out(`\nthe run stopped early: ${r.error}`);
    if (!o.plan) out(`seed ${o.seed}`);
    return r.failures.length > 0 || r.error ? 1 : 0;
  } finally {
    Deno.removeSignalListener("SIGINT", onInt);
  }
}

async function minimize(o: FuzzOptions): Promise<number> {
  const out = o.out;
  let plan = o.plan;
  if (!plan) {
    out(`minimize: running case ${o.cases!.first} of seed ${o.seed} on ${o.devices.join(", ")}`);
    const r = await runVhostFuzz({ ...o, artefacts: false, out: () => {} });
    plan = r.failures.find((f) => f.plan)?.plan ?? undefined;
    if (!plan) {
      out("minimize: the case did not fail");
      return 0;
    }
  }
  const m = await minimizeCase(plan, { fuzz: o, out });
  if (!m) {
    out("minimize: the case did not fail (3 tries)");
    return 0;
  }
  const dir = o.keepDir ?? await Deno.makeTempDir({ prefix: "mpq-fuzz-vhost-min-" });
  await Deno.mkdir(dir, { recursive: true });
  const file = `${dir}/min-${m.plan.device}-seed${m.plan.seed}-case${m.plan.caseNo}-${m.kind}.json`;
  await Deno.writeTextFile(file, planToJson(m.plan) + "\n");
  out(
    `\nminimal reproduction (${m.kind}, ${m.plan.steps.length} of ${plan.steps.length} steps, ${m.attempts} attempts): ${m.summary}`,
  );
  for (const l of describePlan(m.plan)) out(`  ${l}`);
  out(`saved as ${file}`);
  out(
    `replay: deno task fuzz vhost --plan-file=${file}${
      o.replayArgs.length ? " " + o.replayArgs.join(" ") : ""
    }`,
  );
  return 1;
}
