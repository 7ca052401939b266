/**
 * The vhost fuzz runner: for each device, starts `mpq vhost blk|rng`, records the front-end's
 * handshakes, checks a well-behaved front-end is served (the clean session), then runs case after
 * case, each on its own connection, until the message and ring-state budgets are spent (or exactly
 * the cases asked for). After every case:
 *
 * - a new connection's GET_FEATURES probe must be answered (which also proves the daemon finished
 *   closing the previous connection); the daemon must not have exited (a crash; exit status and
 *   stderr reported) nor stopped answering (a hang: no reply within the timeout, the daemon is
 *   then killed and restarted);
 * - its open fds and shared-memory mappings (from /proc) must not exceed the baseline taken the
 *   same way after the clean session, allowing `settleMs` for mappings released once drained;
 * - every `verifyEvery` cases and at the end, the well-behaved front-end must get verified I/O.
 *
 * A failure is printed with the seed, the case number, the command that replays it and the exact
 * steps of the case, with the daemon's stderr for that case; the daemon's logs are kept.
 * @module
 */
import { makeDiskFile } from "../../tests/helpers/vhost_backends.ts";
import { FdPool } from "./fd_pool.ts";
import { DISK_SIZE, type FuzzDevice, type Layout, queuesFor } from "./layout.ts";
import { planCase } from "./plan.ts";
import { CaseConnection, type CaseResult, type SessionEnv } from "./session.ts";
import { type CaseKind, type CasePlan, describePlan } from "./steps.ts";
import { DaemonUnderTest, extra, type Snapshot } from "./target.ts";
import { recordTemplates, type Template } from "./template.ts";
import { verifyFrontend } from "./verify.ts";

/** What to run. */
export interface FuzzOptions {
  devices: readonly FuzzDevice[];
  /** Messages to send in all (split between the devices). */
  messages: number;
  /** Ring states to try in all (split between the devices). */
  rings: number;
  seed: number;
  /** Run exactly these cases (a replay), ignoring the budgets. */
  cases?: { first: number; last: number };
  /** Run only this plan (a saved or minimized case), on `plan.device`. */
  plan?: CasePlan;
  /** The file `plan` came from (for the replay command). */
  planFile?: string;
  /** Write failures.txt and keep daemon logs (default true). */
  artefacts?: boolean;
  /** Keep the daemon logs even when nothing failed. */
  keepLogs?: boolean;
  kinds: readonly CaseKind[];
  /** A verified-I/O check every this many cases (0: only after start and at the end). */
  verifyEvery: number;
  /** Probe and request timeout (ms): no answer within it is a hang. */
  timeoutMs: number;
  /** A probe answered later than this (ms) is a stall. */
  stallMs: number;
  /** How long fds and mappings over the baseline may take to go away (ms). */
  settleMs: number;
  /** Extra daemon arguments for blk (e.g. --engine=vmcopy). */
  blkArgs: readonly string[];
  /** Extra arguments that must be repeated to replay a case (printed in the replay command). */
  replayArgs: readonly string[];
  /** Where to keep reports and daemon logs (default: a new temp dir, made only if something fails). */
  keepDir?: string;
  /** Full reports printed (later failures get one line each; all go to the report file). */
  maxReports: number;
  /** Print every case's plan before running it. */
  printPlans: boolean;
  /** Progress line every this many seconds (0: none). */
  progressSeconds: number;
  /** Output (progress, reports, figures). */
  out: (line: string) => void;
  /** Stops the run after the current case. */
  signal?: AbortSignal;
  /** Stops starting new cases after this many seconds in all (0: no limit). */
  maxSeconds?: number;
  /** performance.now() past which no case starts (set from maxSeconds). */
  deadline?: number;
}

/** The run's figures. */
export interface Figures {
  cases: number;
  messages: number;
  ringStates: number;
  crashes: number;
  hangs: number;
  stalls: number;
  fdLeaks: number;
  mapLeaks: number;
  ioFailures: number;
  verifyFailures: number;
  verifications: number;
  /** Cases the daemon ended by closing the connection (refused input: fine). */
  closed: number;
  /** Probes answered only after resynchronizing (the framing model disagreed: worth a look). */
  resyncs: number;
  daemonStarts: number;
  /** 1 when --max-seconds stopped the run before the budgets were spent. */
  timedOut: number;
  elapsedMs: number;
}

/** A new set of zero figures. */
export function emptyFigures(): Figures {
  return {
    cases: 0,
    messages: 0,
    ringStates: 0,
    crashes: 0,
    hangs: 0,
    stalls: 0,
    fdLeaks: 0,
    mapLeaks: 0,
    ioFailures: 0,
    verifyFailures: 0,
    verifications: 0,
    closed: 0,
    resyncs: 0,
    daemonStarts: 0,
    timedOut: 0,
    elapsedMs: 0,
  };
}

/** Kinds of failure. */
export type FailureKind = "crash" | "hang" | "stall" | "fd-leak" | "map-leak" | "io" | "verify";

/** One failure, with everything needed to replay it. */
export interface FuzzFailure {
  kind: FailureKind;
  device: FuzzDevice;
  seed: number;
  /** The case it is blamed on (null: the clean session after a start). */
  caseNo: number | null;
  caseKind: CaseKind | null;
  /** One line. */
  summary: string;
  detail: string[];
  /** The case's steps, as sent. */
  steps: string[];
  /** The daemon's stderr while the case ran. */
  stderr: string[];
  /** Command that replays the case. */
  replay: string | null;
  /** Failures with the same signature are one distinct problem. */
  signature: string;
  /** The case's plan (for minimizing it). */
  plan: CasePlan | null;
}

/** What a run found. */
export interface FuzzResult {
  figures: Figures;
  byDevice: Partial<Record<FuzzDevice, Figures>>;
  failures: FuzzFailure[];
  /** Where reports and daemon logs were kept (null: nothing failed). */
  artefacts: string | null;
  /** Why the run stopped early (the daemon could not be started or brought back), or null. */
  error: string | null;
}

/** What a problem found after a case is blamed on. */
interface Blame {
  label: string;
  plan: CasePlan | null;
  logFrom: number;
  result?: CaseResult;
}

function addFigures(into: Figures, f: Figures): void {
  for (const k of Object.keys(into) as (keyof Figures)[]) into[k] += f[k];
}

/** A signature with numbers blurred, so one bug found in many cases counts once. */
function blur(s: string): string {
  return s.replace(/0x[0-9a-f]+/gi, "X").replace(/\d+/g, "N");
}

/** The daemon's own words about what went wrong (errors, not the rejections it is meant to log). */
const DAEMON_TROUBLE = /device error|still in flight|Uncaught|panicked|error:|Error:|SIGBUS|Segmentation/;

/**
 * What makes two failures the same problem: for crashes, hangs and stalls the daemon's trouble
 * lines (or, without any, the exit status and the case family), for leaks what leaked, otherwise
 * the case family (and for fds and memtable cases what they did).
 */
function signatureKey(kind: FailureKind, key: string, stderr: readonly string[], tagKey: string): string {
  if (kind === "fd-leak" || kind === "map-leak") return key;
  if (kind === "crash" || kind === "hang" || kind === "stall") {
    const trouble = [...new Set(stderr.filter((l) => DAEMON_TROUBLE.test(l)).map(blur))].sort();
    return trouble.length ? `${key}|${trouble.join("|")}` : `${key}|${tagKey}`;
  }
  return tagKey;
}

const SIGNALS: Record<number, string> = {
  4: "SIGILL",
  6: "SIGABRT",
  7: "SIGBUS: a mapping touched past its file's end",
  8: "SIGFPE",
  9: "SIGKILL",
  11: "SIGSEGV: an access to unmapped memory",
  15: "SIGTERM",
};

/** "killed by signal 7" -> "killed by signal 7 (SIGBUS: ...)", as a shell would say exit 135. */
function namedSignal(status: string): string {
  const m = /signal (\d+)$/.exec(status);
  const name = m ? SIGNALS[Number(m[1])] : undefined;
  return name ? `${status} (${name}; a shell reports exit ${128 + Number(m![1])})` : status;
}

class Reporter {
  readonly failures: FuzzFailure[] = [];
  readonly #o: FuzzOptions;
  readonly #seen = new Set<string>();
  #printed = 0;
  #dir: string | null = null;

  constructor(o: FuzzOptions) {
    this.#o = o;
  }

  get dir(): string | null {
    return this.#dir;
  }

  async artefactDir(): Promise<string> {
    if (this.#dir) return this.#dir;
    if (this.#o.keepDir) {
      await Deno.mkdir(this.#o.keepDir, { recursive: true });
      this.#dir = this.#o.keepDir;
    } else {
      this.#dir = await Deno.makeTempDir({ prefix: "mpq-fuzz-vhost-report-" });
    }
    return this.#dir;
  }

  async report(f: FuzzFailure): Promise<void> {
    this.failures.push(f);
    const lines = formatFailure(f);
    if (this.#o.artefacts !== false) {
      const dir = await this.artefactDir();
      await Deno.writeTextFile(`${dir}/failures.txt`, lines.join("\n") + "\n\n", { append: true });
    }
    const fresh = !this.#seen.has(f.signature);
    this.#seen.add(f.signature);
    if (fresh || this.#printed < this.#o.maxReports) {
      this.#printed++;
      for (const l of lines) this.#o.out(l);
    } else {
      this.#o.out(`FAIL ${f.kind}: ${f.summary} (again; ${f.replay ?? ""})`);
    }
  }
}

/** A failure as printed: what, the replay command, the steps, the daemon's stderr. */
export function formatFailure(f: FuzzFailure): string[] {
  const out = [`FAIL ${f.kind}: ${f.summary}`];
  out.push(
    `  seed ${f.seed}, device ${f.device}, ${
      f.caseNo === null ? "not in a case" : `case ${f.caseNo} (${f.caseKind})`
    }`,
  );
  if (f.replay) out.push(`  replay: ${f.replay}`);
  for (const d of f.detail) out.push(`  ${d}`);
  if (f.steps.length) {
    out.push("  steps (as sent):");
    for (const s of f.steps) out.push(`    ${s}`);
  }
  if (f.stderr.length) {
    out.push("  daemon stderr during the case:");
    for (const s of f.stderr) out.push(`    | ${s}`);
  }
  return out;
}

/** The figures as printed. */
export function formatFigures(f: Figures, label: string): string {
  const s = f.elapsedMs / 1000;
  return `${label}: messages sent ${f.messages}, ring states tried ${f.ringStates}, cases ${f.cases}, crashes ${f.crashes}, hangs ${f.hangs}, stalls ${f.stalls}, fd leaks ${f.fdLeaks}, mapping leaks ${f.mapLeaks}, I/O failures ${f.ioFailures}, verify failures ${f.verifyFailures} (of ${f.verifications} verifications), cases closed by the daemon ${f.closed}, resyncs ${f.resyncs}, daemon starts ${f.daemonStarts}, elapsed ${
    s.toFixed(1)
  } s, ${Math.round(f.messages / Math.max(s, 0.001))} messages/s${
    f.timedOut ? " (stopped by --max-seconds)" : ""
  }`;
}

/** The fuzzing of one device: one daemon (restarted after a crash or hang) and its cases. */
class DeviceRun {
  readonly figures = emptyFigures();
  readonly #o: FuzzOptions;
  readonly #device: FuzzDevice;
  readonly #budget: { messages: number; rings: number };
  readonly #reporter: Reporter;
  #dir = "";
  #diskPath: string | undefined;
  #daemon: DaemonUnderTest | null = null;
  #pool: FdPool | null = null;
  #env: SessionEnv | null = null;
  #layout: Layout | null = null;
  #templates: Template[] = [];
  #baseline: Snapshot | null = null;
  #verifyRound = 0;
  #failed = false;

  constructor(
    o: FuzzOptions,
    device: FuzzDevice,
    budget: { messages: number; rings: number },
    reporter: Reporter,
  ) {
    this.#o = o;
    this.#device = device;
    this.#budget = budget;
    this.#reporter = reporter;
  }

  get #d(): DaemonUnderTest {
    return this.#daemon!;
  }

  async run(): Promise<void> {
    const t0 = performance.now();
    this.#dir = await Deno.makeTempDir({ prefix: `mpq-fuzz-vhost-${this.#device}-` });
    let conn: CaseConnection | null = null;
    try {
      const args: string[] = [];
      if (this.#device === "blk") {
        this.#diskPath = `${this.#dir}/disk.img`;
        await makeDiskFile(this.#diskPath, DISK_SIZE);
        args.push(`--blk-file=${this.#diskPath}`, `--num-queues=${queuesFor("blk")}`, ...this.#o.blkArgs);
      }
      this.#daemon = new DaemonUnderTest(this.#device, this.#dir, args);
      await this.#start();
      const rec = await recordTemplates(this.#d.socketPath, this.#device, this.#o.timeoutMs);
      this.#layout = rec.layout;
      this.#templates = rec.templates;
      this.#pool = await FdPool.create(this.#dir, this.#layout);
      this.#env = {
        socketPath: this.#d.socketPath,
        device: this.#device,
        layout: this.#layout,
        pool: this.#pool,
        timeoutMs: this.#o.timeoutMs,
        diskPath: this.#diskPath,
      };
      await this.#clean();
      conn = await this.#open(null);
      const first = this.#o.cases?.first ?? 0;
      let lastProgress = performance.now();
      const given = this.#o.plan;
      for (let n = given ? given.caseNo : first;; n++) {
        if (this.#o.signal?.aborted || this.#pastDeadline()) break;
        if (given ? n > given.caseNo : this.#o.cases ? n > this.#o.cases.last : this.#spent()) break;
        const plan = given ?? planCase(this.#o.seed, n, {
          device: this.#device,
          layout: this.#layout,
          templates: this.#templates,
          kinds: this.#o.kinds,
        });
        if (this.#o.printPlans) { for (const l of describePlan(plan)) this.#o.out(l); }
        const logFrom = this.#d.logSize();
        const res = await conn.run(plan);
        await conn.close();
        conn = null;
        this.figures.cases++;
        this.figures.messages += res.messages;
        this.figures.ringStates += res.ringStates;
        if (res.end === "closed") this.figures.closed++;
        if (res.resynced) this.figures.resyncs++;
        let blame: Blame | null = { label: `case ${n}`, plan, logFrom, result: res };
        if (res.ioFailures.length > 0) {
          this.figures.ioFailures++;
          await this.#fail(
            "io",
            blame,
            `well-behaved requests failed in case ${n} (${plan.tag})`,
            res.ioFailures,
          );
        }
        if (res.end !== "hang" && res.slowestProbeMs > this.#o.stallMs) {
          this.figures.stalls++;
          await this.#fail(
            "stall",
            blame,
            `mpq vhost ${this.#device} took ${
              Math.round(res.slowestProbeMs)
            } ms to answer a probe in case ${n} (${plan.tag})`,
            [`the slowest probe followed step ${
              res.slowestProbeStep === null ? "the last" : `#${res.slowestProbeStep}`
            }`],
          );
        }
        if (res.end === "hang") {
          await this.#hang(
            blame,
            `${res.hangDetail}${res.atStep !== null ? ` (at step #${res.atStep})` : ""}`,
          );
          blame = null;
        }
        if (this.#o.verifyEvery > 0 && this.figures.cases % this.#o.verifyEvery === 0) {
          blame = await this.#verify(blame, `after case ${n}`);
        }
        conn = await this.#open(blame);
        if (
          this.#o.progressSeconds > 0 && performance.now() - lastProgress > this.#o.progressSeconds * 1000
        ) {
          lastProgress = performance.now();
          this.#o.out(
            `[${
              ((performance.now() - t0) / 1000).toFixed(1)
            } s] ${this.#device}: case ${n}, ${this.figures.messages} messages, ${this.figures.ringStates} ring states, ${this.#reporter.failures.length} failure(s)`,
          );
        }
      }
      await conn.close();
      conn = null;
      const blame = await this.#verify(null, "at the end");
      conn = await this.#open(blame);
      await conn.close();
      conn = null;
    } finally {
      if (conn) await conn.close();
      if (this.#daemon) await this.#daemon.stop();
      this.#pool?.close();
      this.figures.elapsedMs = performance.now() - t0;
      await this.#keepLogs();
      await Deno.remove(this.#dir, { recursive: true });
    }
  }

  #pastDeadline(): boolean {
    const d = this.#o.deadline;
    if (d !== undefined && performance.now() > d) {
      this.figures.timedOut = 1;
      return true;
    }
    return false;
  }

  #spent(): boolean {
    return this.figures.messages >= this.#budget.messages && this.figures.ringStates >= this.#budget.rings;
  }

  async #start(): Promise<void> {
    await this.#d.start();
    this.figures.daemonStarts++;
    this.#baseline = null;
  }

  /** The clean session after a start: the daemon must serve a well-behaved front-end. */
  async #clean(): Promise<void> {
    const from = this.#d.logSize();
    const err = await verifyFrontend(this.#d.socketPath, this.#device, {
      diskPath: this.#diskPath,
      round: this.#verifyRound++,
      timeoutMs: this.#o.timeoutMs,
    });
    this.figures.verifications++;
    if (err === null) return;
    this.figures.verifyFailures++;
    await this.#fail(
      "verify",
      { label: "the clean session", plan: null, logFrom: from },
      `a freshly started daemon did not serve a well-behaved front-end: ${err}`,
      [],
    );
    throw new Error(
      `mpq vhost ${this.#device} does not serve a well-behaved front-end after starting: ${err}`,
    );
  }

  /** Restarts after a crash or hang. */
  async #restart(): Promise<void> {
    if (!this.#d.exited()) await this.#d.kill();
    await this.#start();
    await this.#clean();
  }

  /** The periodic well-behaved check; returns what the next open should blame. */
  async #verify(blame: Blame | null, when: string): Promise<Blame | null> {
    const from = this.#d.logSize();
    const err = await verifyFrontend(this.#d.socketPath, this.#device, {
      diskPath: this.#diskPath,
      round: this.#verifyRound++,
      timeoutMs: this.#o.timeoutMs,
    });
    this.figures.verifications++;
    const vb: Blame = {
      label: `the verification ${when}${blame ? ` (after ${blame.label})` : ""}`,
      plan: blame?.plan ?? null,
      logFrom: blame?.logFrom ?? from,
    };
    if (err !== null) {
      const st = this.#d.exited() ?? await this.#d.waitExit(100);
      if (st) return vb; // the open after this reports the crash
      this.figures.verifyFailures++;
      await this.#fail("verify", vb, `a well-behaved front-end ${when} was not served: ${err}`, []);
      if (/within \d+ ms/.test(err)) {
        await this.#hang(vb, `verified I/O ${when} timed out`);
        return null;
      }
    }
    return vb;
  }

  /**
   * Opens the next case's connection: it must connect, have its probe answered, and the daemon
   * must not hold more than the baseline. Problems are blamed on `blame` and end in a restart.
   */
  async #open(blame: Blame | null): Promise<CaseConnection> {
    for (let attempt = 0; attempt < 4; attempt++) {
      const gone = this.#d.exited();
      if (gone) {
        await this.#crash(blame, gone.text);
        blame = null;
        continue;
      }
      let conn: CaseConnection;
      try {
        conn = await CaseConnection.open(this.#env!);
      } catch (e) {
        const st = await this.#d.waitExit(this.#o.timeoutMs);
        if (st) await this.#crash(blame, st.text);
        else await this.#hang(blame, `the daemon did not accept a new connection: ${(e as Error).message}`);
        blame = null;
        continue;
      }
      const r = await conn.sync();
      if (r.end === "answered") {
        if (blame && r.ms > this.#o.stallMs) {
          this.figures.stalls++;
          await this.#fail(
            "stall",
            blame,
            `mpq vhost ${this.#device} took ${
              Math.round(r.ms)
            } ms to answer a new connection after ${blame.label} (closing the last one)`,
            [],
          );
        }
        await this.#checkHoldings(blame);
        return conn;
      }
      await conn.close();
      if (r.end === "closed") {
        const st = await this.#d.waitExit(this.#o.timeoutMs);
        if (st) await this.#crash(blame, st.text);
        else await this.#hang(blame, "the daemon closed a new connection before answering GET_FEATURES");
      } else {
        await this.#hang(
          blame,
          `after ${
            blame?.label ?? "starting"
          }, a new connection's GET_FEATURES got no reply within ${this.#o.timeoutMs} ms (stuck closing the last connection, or in the background)`,
        );
      }
      blame = null;
    }
    throw new Error(`mpq vhost ${this.#device} could not be brought back after repeated failures`);
  }

  async #checkHoldings(blame: Blame | null): Promise<void> {
    if (this.#baseline === null || blame === null) {
      this.#baseline = this.#d.snapshot();
      return;
    }
    const base = this.#baseline;
    let snap = this.#d.snapshot();
    const over = (s: Snapshot) => s.fds.length > base.fds.length || s.maps.length > base.maps.length;
    const deadline = performance.now() + this.#o.settleMs;
    while (over(snap) && performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 10));
      snap = this.#d.snapshot();
    }
    if (snap.fds.length > base.fds.length) {
      this.figures.fdLeaks++;
      const more = extra(base.fds, snap.fds);
      await this.#fail(
        "fd-leak",
        blame,
        `${snap.fds.length - base.fds.length} fd(s) more than the baseline after ${blame.label} (${
          more.join(", ")
        })`,
        [
          `baseline ${base.fds.length} fds, now ${snap.fds.length} after ${this.#o.settleMs} ms`,
          `not in the baseline: ${more.join(", ")}`,
        ],
        more.join(","),
      );
    }
    if (snap.maps.length > base.maps.length) {
      this.figures.mapLeaks++;
      const more = extra(base.maps, snap.maps);
      await this.#fail(
        "map-leak",
        blame,
        `${
          snap.maps.length - base.maps.length
        } shared-memory mapping(s) more than the baseline after ${blame.label}`,
        [
          `baseline ${base.maps.length} memfd/shm mappings, now ${snap.maps.length} after ${this.#o.settleMs} ms`,
          ...more.map((m) => `not in the baseline: ${m}`),
        ],
        more.map((m) => m.replace(/ \d+ bytes.*/, "")).join(","),
      );
    }
    // Judge later cases by what they add, not by this one's leak again.
    if (over(snap)) this.#baseline = snap;
  }

  async #crash(blame: Blame | null, exit: string): Promise<void> {
    this.figures.crashes++;
    const status = namedSignal(exit);
    await this.#fail(
      "crash",
      blame,
      `mpq vhost ${this.#device} ${status}${blame ? ` after ${blame.label}` : ""}${
        blame?.plan ? ` (${blame.plan.tag})` : ""
      }`,
      [
        `exit status: ${status}`,
        ...(blame?.result?.atStep === 0 && blame.plan
          ? [
            `the daemon was gone before this case's first message took effect: an earlier case left it dying ` +
            `(replay a range: --case ${Math.max(0, blame.plan.caseNo - 5)}-${blame.plan.caseNo})`,
          ]
          : []),
      ],
      status,
    );
    await this.#restart();
  }

  async #hang(blame: Blame | null, why: string): Promise<void> {
    this.figures.hangs++;
    const state = this.#procState();
    await this.#fail(
      "hang",
      blame,
      `mpq vhost ${this.#device} hung${blame ? ` in ${blame.label}` : ""}${
        blame?.plan ? ` (${blame.plan.tag})` : ""
      }: ${why}`,
      [why, state],
    );
    await this.#d.kill();
    await this.#restart();
  }

  /** Whether a hung daemon spins or sleeps (CPU time over 200 ms, state, wchan). */
  #procState(): string {
    try {
      const pid = this.#d.pid;
      const stat = (): number[] =>
        Deno.readTextFileSync(`/proc/${pid}/stat`).replace(/^.*\) /, "").split(" ").map(Number);
      const a = stat();
      const t = performance.now();
      while (performance.now() - t < 200) { /* sample CPU time over 200 ms */ }
      const b = stat();
      const ticks = (b[11] + b[12]) - (a[11] + a[12]);
      const state = Deno.readTextFileSync(`/proc/${pid}/status`).match(/^State:\s*(.*)$/m)?.[1] ?? "?";
      let wchan = "";
      try {
        wchan = Deno.readTextFileSync(`/proc/${pid}/wchan`);
      } catch { /* not readable */ }
      return `daemon state ${state}, wchan ${wchan || "-"}, ${ticks} CPU ticks in 200 ms (${
        ticks >= 15 ? "spinning" : "idle"
      })`;
    } catch (e) {
      return `daemon state unknown: ${(e as Error).message}`;
    }
  }

  async #fail(
    kind: FailureKind,
    blame: Blame | null,
    summary: string,
    detail: string[],
    key = "",
  ): Promise<void> {
    this.#failed = true;
    const plan = blame?.plan ?? null;
    const o = this.#o;
    const more = o.replayArgs.length ? " " + o.replayArgs.join(" ") : "";
    const replay = o.plan
      ? (o.planFile ? `deno task fuzz vhost --plan-file=${o.planFile}${more}` : null)
      : plan
      ? `deno task fuzz vhost --device ${this.#device} --seed ${o.seed} --case ${plan.caseNo}${more}`
      : null;
    const tagKey = plan && (plan.kind === "fds" || plan.kind === "memtable") ? plan.tag : plan?.kind ?? "";
    const result = blame?.result;
    const extraDetail = result && result.atStep !== null
      ? [
        `the daemon ${
          result.end === "closed" ? "closed the connection" : "stopped answering"
        } at step #${result.atStep}`,
      ]
      : [];
    const stderr = blame ? this.#d.logSince(blame.logFrom, 200) : [];
    await this.#reporter.report({
      kind,
      device: this.#device,
      seed: plan?.seed ?? o.seed,
      caseNo: plan?.caseNo ?? null,
      caseKind: plan?.kind ?? null,
      summary,
      detail: [...detail, ...extraDetail],
      steps: plan ? describePlan(plan).slice(1) : [],
      stderr: stderr.length > 40
        ? [`... (${stderr.length - 40} lines before these in the log)`, ...stderr.slice(-40)]
        : stderr,
      replay,
      plan,
      signature: blur(`${kind}|${this.#device}|${signatureKey(kind, key, stderr, tagKey)}`),
    });
  }

  async #keepLogs(): Promise<void> {
    if (!(this.#failed || this.#o.keepLogs) || this.#o.artefacts === false) return;
    const dir = await this.#reporter.artefactDir();
    for (const e of Deno.readDirSync(this.#dir)) {
      if (e.name.endsWith(".log")) {
        await Deno.copyFile(`${this.#dir}/${e.name}`, `${dir}/${this.#device}-${e.name}`);
      }
    }
  }
}

/**
 * Runs the fuzzer and returns its figures and failures (also printed through `options.out`).
 * @example
 * const r = await runVhostFuzz({ ...defaults, devices: ["blk"], messages: 2000, rings: 200, seed: 1 });
 * if (r.failures.length) console.error(r.failures.map((f) => f.summary).join("\n"));
 */
export async function runVhostFuzz(options: FuzzOptions): Promise<FuzzResult> {
  if (options.maxSeconds && options.deadline === undefined) {
    options = { ...options, deadline: performance.now() + options.maxSeconds * 1000 };
  }
  const reporter = new Reporter(options);
  const byDevice: Partial<Record<FuzzDevice, Figures>> = {};
  const total = emptyFigures();
  const devices = options.plan ? [options.plan.device] : options.devices;
  const n = devices.length;
  for (const device of devices) {
    const run = new DeviceRun(options, device, {
      messages: Math.ceil(options.messages / n),
      rings: Math.ceil(options.rings / n),
    }, reporter);
    let error: string | null = null;
    try {
      await run.run();
    } catch (e) {
      error = `${device}: ${(e as Error).message}`;
    } finally {
      byDevice[device] = run.figures;
      addFigures(total, run.figures);
    }
    if (error !== null) {
      return { figures: total, byDevice, failures: reporter.failures, artefacts: reporter.dir, error };
    }
    if (options.signal?.aborted) break;
  }
  return { figures: total, byDevice, failures: reporter.failures, artefacts: reporter.dir, error: null };
}

/** Distinct failures (by signature): the first of each and how often it was seen. */
export function distinctFailures(failures: readonly FuzzFailure[]): { first: FuzzFailure; count: number }[] {
  const m = new Map<string, { first: FuzzFailure; count: number }>();
  for (const f of failures) {
    const e = m.get(f.signature);
    if (e) e.count++;
    else m.set(f.signature, { first: f, count: 1 });
  }
  return [...m.values()];
}
