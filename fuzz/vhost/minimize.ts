/**
 * Shrinks a failing case to a minimal reproduction: delta debugging (ddmin, complements only) over
 * the case's steps, then over the descriptors and memory writes of each remaining ring state. Every
 * attempt runs the candidate on a freshly started daemon through the runner (same checks), and a
 * candidate counts when it fails in the same way (crash, hang, stall, leak, I/O) in the case itself.
 * @module
 */
import { type FailureKind, type FuzzOptions, runVhostFuzz } from "./runner.ts";
import type { CasePlan, RingStep, Step } from "./steps.ts";

/** Which failure to keep when a case shows several. */
const PRIORITY: readonly FailureKind[] = ["crash", "hang", "io", "stall", "fd-leak", "map-leak", "verify"];

/** Options of a minimization. */
export interface MinimizeOptions {
  /** Runner options for each attempt (timeouts, daemon arguments). */
  fuzz: FuzzOptions;
  /** Progress lines. */
  out: (line: string) => void;
  /** Give up after this many attempts (default 400). */
  maxAttempts?: number;
}

/** The result: the smallest plan that still fails the same way. */
export interface Minimized {
  plan: CasePlan;
  kind: FailureKind;
  attempts: number;
  summary: string;
}

async function complementDdmin<T>(items: T[], fails: (xs: T[]) => Promise<boolean>): Promise<T[]> {
  let n = 2;
  while (items.length >= 2) {
    const chunk = Math.ceil(items.length / n);
    let reduced = false;
    for (let i = 0; i < n && i * chunk < items.length; i++) {
      const rest = [...items.slice(0, i * chunk), ...items.slice((i + 1) * chunk)];
      if (rest.length > 0 && await fails(rest)) {
        items = rest;
        n = Math.max(n - 1, 2);
        reduced = true;
        break;
      }
    }
    if (!reduced) {
      if (n >= items.length) break;
      n = Math.min(items.length, n * 2);
    }
  }
  return items;
}

/** `steps` with a kick after every ring state that no later kick of its queue follows. */
export function withKicks(steps: readonly Step[]): Step[] {
  const out: Step[] = [];
  steps.forEach((s, i) => {
    out.push(s);
    if (s.op === "ring" && !steps.slice(i + 1).some((t) => t.op === "kick" && t.queue === s.queue)) {
      out.push({ op: "kick", queue: s.queue });
    }
  });
  return out;
}

/**
 * Minimizes `plan`; null when it does not fail at all (three tries).
 * @example
 * const m = await minimizeCase(plan, { fuzz: options, out: console.log });
 */
export async function minimizeCase(plan: CasePlan, options: MinimizeOptions): Promise<Minimized | null> {
  const max = options.maxAttempts ?? 400;
  let attempts = 0;
  let summary = "";
  const run = async (p: CasePlan): Promise<Set<FailureKind>> => {
    attempts++;
    const r = await runVhostFuzz({
      ...options.fuzz,
      plan: p,
      planFile: undefined,
      artefacts: false,
      verifyEvery: 0,
      progressSeconds: 0,
      printPlans: false,
      out: () => {},
    });
    const mine = r.failures.filter((f) => f.caseNo === p.caseNo);
    if (mine.length) summary = mine[0].summary;
    return new Set(mine.map((f) => f.kind));
  };
  let kinds = new Set<FailureKind>();
  for (let i = 0; i < 3 && kinds.size === 0; i++) kinds = await run(plan);
  const kind = PRIORITY.find((k) => kinds.has(k));
  if (!kind) return null;
  let firstSummary = summary;
  options.out(
    `minimize: case ${plan.caseNo} fails with ${kind} (${plan.steps.length} steps): ${firstSummary}`,
  );
  const fails = async (steps: Step[]): Promise<boolean> => {
    if (attempts >= max) return false;
    const got = await run({ ...plan, steps });
    const ok = got.has(kind);
    options.out(
      `minimize: attempt ${attempts}: ${steps.length} steps: ${ok ? `still fails (${kind})` : "passes"}`,
    );
    if (ok) firstSummary = summary;
    return ok;
  };
  let steps = await complementDdmin(plan.steps.slice(), fails);
  // Then each remaining ring state: its descriptors and memory writes.
  for (let i = 0; i < steps.length; i++) {
    const s = steps[i];
    if (s.op !== "ring") continue;
    const withState = (st: RingStep["state"]): Step[] =>
      steps.map((x, j) => j === i ? { ...s, state: st } : x);
    const descs = await complementDdmin(
      s.state.descs.slice(),
      (ds) => fails(withState({ ...s.state, descs: ds })),
    );
    const memory = await complementDdmin(
      s.state.memory.slice(),
      (ms) => fails(withState({ ...s.state, descs, memory: ms })),
    );
    steps = withState({ ...s.state, descs, memory });
  }
  // A ring state found by busy-polling needs no kick to fail, but a replay should not depend on
  // that timing: kick every queue whose last ring state has none after it (kept if it still fails).
  const kicked = withKicks(steps);
  if (kicked.length !== steps.length && await fails(kicked)) steps = kicked;
  return {
    plan: { ...plan, tag: `${plan.tag} (minimized from ${plan.steps.length} steps)`, steps },
    kind,
    attempts,
    summary: firstSummary,
  };
}
