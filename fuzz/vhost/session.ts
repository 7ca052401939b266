/**
 * Runs a case plan on one connection: a fresh front-end (fresh guest RAM, rings and eventfds) and
 * fresh per-case fds, every message through the {@link FramingModel} so the runner knows where
 * message boundaries are and how many GET_FEATURES replies to expect, ring states written into
 * guest memory, well-behaved requests submitted through the front-end's own ring and checked.
 *
 * `sync()` is the probe: it brings the stream to a message boundary, sends GET_FEATURES and waits
 * until its reply (or a close) arrives. No reply within the timeout is a hang; when the framing
 * model may have been wrong (a back-end more lenient than the model), one resynchronization (a
 * full payload of zeros, then another probe) is tried before calling it one.
 * @module
 */
import { Blk, FrontendError, MsgFlags, Req, VhostUserFrontend } from "../../tests/helpers/vhost_frontend.ts";
import { patternBytes, readFileRange } from "../../tests/helpers/vhost_backends.ts";
import type { Segment } from "../../tests/helpers/virtio_ring.ts";
import { CaseFds, type FdPool } from "./fd_pool.ts";
import { FramingModel, HEADER_SIZE, MAX_PAYLOAD } from "./framing.ts";
import { allocateLayout, frontendOptions, type FuzzDevice, type Layout, sameLayout } from "./layout.ts";
import { writeRingState } from "./ring_state.ts";
import { type CasePlan, type IoStep, send, type SendStep, wireBytes } from "./steps.ts";

/** How long connecting may retry (a listening daemon accepts at once; a dead one refuses). */
const CONNECT_MS = 300;
/** How long the probe after a resynchronization may take. */
const RESYNC_MS = 1000;
/** Bytes sent without a probe before the runner inserts one (keeps the socket buffer from filling). */
const UNSYNCED_LIMIT = 32 << 10;

/** What a case connection needs. */
export interface SessionEnv {
  socketPath: string;
  device: FuzzDevice;
  layout: Layout;
  pool: FdPool;
  /** Probe and request timeout. */
  timeoutMs: number;
  /** The disk file (blk), for checking data on disk. */
  diskPath?: string;
}

/** How a probe ended. */
export type ProbeEnd = "answered" | "closed" | "hang";

/** A probe's outcome and how long it took. */
export interface Probe {
  end: ProbeEnd;
  detail: string;
  ms: number;
}

/** What running a plan found. */
export interface CaseResult {
  end: ProbeEnd;
  /** The step at which the back-end closed the connection or stopped answering (null: after the last). */
  atStep: number | null;
  /** Why it is considered hung. */
  hangDetail: string;
  messages: number;
  ringStates: number;
  /** Well-behaved requests that should have succeeded and did not. */
  ioFailures: string[];
  /** The framing model disagreed with the back-end and a resynchronization was needed. */
  resynced: boolean;
  /** The slowest probe answer (ms) and the step it followed. */
  slowestProbeMs: number;
  slowestProbeStep: number | null;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * One connection to the daemon, with a fresh front-end.
 * @example
 * const conn = await CaseConnection.open(env);
 * if ((await conn.sync()) === "answered") await conn.run(plan);
 * await conn.close();
 */
export class CaseConnection {
  readonly fe: VhostUserFrontend;
  readonly fds: CaseFds;
  readonly #env: SessionEnv;
  readonly framing = new FramingModel();
  #gfReplies = 0;
  #unsynced = 0;
  messages = 0;
  ringStates = 0;
  resynced = false;
  #ioSerial = 0;

  private constructor(fe: VhostUserFrontend, fds: CaseFds, env: SessionEnv) {
    this.fe = fe;
    this.fds = fds;
    this.#env = env;
  }

  /** Connects (throws when nobody accepts within a short time: the daemon is gone). */
  static async open(env: SessionEnv): Promise<CaseConnection> {
    const fe = await VhostUserFrontend.connect(env.socketPath, frontendOptions(env.device, CONNECT_MS));
    // Connecting retried for CONNECT_MS at most; requests wait up to the run's timeout.
    fe.options.timeoutMs = env.timeoutMs;
    let fds: CaseFds | null = null;
    try {
      const layout = allocateLayout(fe, env.device);
      if (!sameLayout(layout, env.layout)) throw new Error("a fuzz front-end laid its RAM out differently");
      fds = new CaseFds(fe, env.pool, env.layout);
    } catch (e) {
      await fe.close();
      throw e;
    }
    return new CaseConnection(fe, fds, env);
  }

  /** Whether the back-end closed the connection. */
  get connected(): boolean {
    return this.fe.connected;
  }

  /** Sends bytes (already fed to the framing model); false when the connection is gone. */
  async #write(bytes: Uint8Array<ArrayBuffer>, roles: readonly string[]): Promise<boolean> {
    const fds = roles.map((r) => this.fds.get(r));
    const deadline = Date.now() + this.#env.timeoutMs;
    while (true) {
      if (!this.fe.connected) return false;
      try {
        this.fe.sendRaw(bytes, fds);
        this.#unsynced += bytes.byteLength;
        return true;
      } catch (e) {
        if (!(e instanceof FrontendError)) throw e;
        if (!this.fe.connected) return false;
        // The back-end is not reading: wait for it, within the timeout (then the probe decides).
        if (Date.now() > deadline) return true;
        await sleep(2);
      }
    }
  }

  async #sendStep(s: SendStep): Promise<boolean> {
    const bytes = wireBytes(s);
    this.framing.feed(bytes);
    this.messages++;
    return await this.#write(bytes, s.fds);
  }

  /** Waits until `target` GET_FEATURES replies have arrived in all; "timeout" when they do not. */
  async #awaitReplies(target: number, ms = this.#env.timeoutMs): Promise<"answered" | "closed" | "timeout"> {
    const deadline = Date.now() + ms;
    while (this.#gfReplies < target) {
      const left = deadline - Date.now();
      if (left <= 0) return "timeout";
      let m;
      try {
        m = await this.fe.waitAny(left);
      } catch (e) {
        if (e instanceof FrontendError) return "timeout";
        throw e;
      }
      if (m === null) return "closed";
      for (const f of m.fds) f.close();
      if (m.request === Req.GET_FEATURES && (m.flags & MsgFlags.REPLY)) this.#gfReplies++;
    }
    return "answered";
  }

  /** Probes: GET_FEATURES must be answered, or the connection closed, within the timeout. */
  async sync(): Promise<Probe> {
    const t0 = performance.now();
    const r = await this.#sync();
    return { ...r, ms: performance.now() - t0 };
  }

  async #sync(): Promise<{ end: ProbeEnd; detail: string }> {
    if (!this.fe.connected) return { end: "closed", detail: "" };
    while (!this.framing.atBoundary) {
      const f = this.framing.filler();
      this.framing.feed(f);
      if (!await this.#write(f, [])) return { end: "closed", detail: "" };
    }
    const expectClose = this.framing.closedBecause !== null;
    if (!expectClose && !await this.#sendStep(send(Req.GET_FEATURES))) return { end: "closed", detail: "" };
    this.#unsynced = 0;
    const target = expectClose ? Number.MAX_SAFE_INTEGER : this.framing.getFeatures;
    const r = await this.#awaitReplies(target);
    if (r !== "timeout") return { end: r, detail: "" };
    // Maybe the back-end frames differently than the model: a payload's worth of zeros completes
    // any message it is still reading (and a zero header is version 0), then probe once more. A
    // back-end that was merely waiting for bytes answers at once; one that is stuck has had its
    // full timeout already.
    this.resynced = true;
    const zeros = new Uint8Array(MAX_PAYLOAD + HEADER_SIZE);
    if (!await this.#write(zeros, [])) return { end: "closed", detail: "" };
    const before = this.#gfReplies;
    if (!await this.#write(wireBytes(send(Req.GET_FEATURES)), [])) return { end: "closed", detail: "" };
    this.messages++;
    const again = await this.#awaitReplies(Math.max(before + 1, this.#gfReplies + 1), RESYNC_MS);
    if (again !== "timeout") return { end: again, detail: "" };
    return {
      end: "hang",
      detail: expectClose
        ? `the connection should have been closed (${this.framing.closedBecause}) and was not, nor was a probe answered within ${this.#env.timeoutMs} ms`
        : `no reply to GET_FEATURES (number ${this.framing.getFeatures} on this connection) within ${this.#env.timeoutMs} ms, nor ${RESYNC_MS} ms after resynchronizing`,
    };
  }

  /** Runs the plan's steps, then the final probe. */
  async run(plan: CasePlan): Promise<CaseResult> {
    const result: CaseResult = {
      end: "answered",
      atStep: null,
      hangDetail: "",
      messages: 0,
      ringStates: 0,
      ioFailures: [],
      resynced: false,
      slowestProbeMs: 0,
      slowestProbeStep: null,
    };
    const probed = (p: Probe, step: number | null) => {
      if (p.end === "answered" && p.ms > result.slowestProbeMs) {
        result.slowestProbeMs = p.ms;
        result.slowestProbeStep = step;
      }
    };
    const pendingOk: { index: number; step: IoStep; done: Promise<string | null> }[] = [];
    const finish = (end: ProbeEnd, atStep: number | null, detail = "") => {
      result.end = end;
      result.atStep = atStep;
      result.hangDetail = detail;
      result.messages = this.messages;
      result.ringStates = this.ringStates;
      result.resynced = this.resynced;
      return result;
    };
    const L = this.#env.layout;
    for (let i = 0; i < plan.steps.length; i++) {
      const s = plan.steps[i];
      if (!this.fe.connected) return finish("closed", i);
      if (s.op === "send" && this.#unsynced > UNSYNCED_LIMIT && this.framing.atBoundary) {
        const r = await this.sync();
        probed(r, i);
        if (r.end !== "answered") return finish(r.end, i, r.detail);
      }
      switch (s.op) {
        case "send":
          if (!await this.#sendStep(s)) return finish("closed", i);
          break;
        case "ring":
          writeRingState(this.fe.ram, L.rings[s.queue], s.state, L.queueSize);
          this.ringStates++;
          break;
        case "kick":
          this.fe.kickQueue(this.fe.queues[s.queue]);
          break;
        case "io": {
          const done = this.#io(s);
          if (s.expect === "ok") pendingOk.push({ index: i, step: s, done });
          else done.catch(() => {});
          break;
        }
        case "await":
          for (const p of pendingOk.splice(0)) {
            const err = await p.done;
            if (err !== null) {
              result.ioFailures.push(
                `step #${p.index} (${p.step.kind} sector ${p.step.sector} len ${p.step.len} in ${p.step.where}): ${err}`,
              );
            }
          }
          break;
        case "sync": {
          const r = await this.sync();
          probed(r, i);
          if (r.end !== "answered") return finish(r.end, i, r.detail);
          break;
        }
      }
    }
    const r = await this.sync();
    probed(r, null);
    return finish(r.end, null, r.detail);
  }

  /** One well-behaved request; resolves with null when it did what it should, else why not. */
  async #io(s: IoStep): Promise<string | null> {
    const fe = this.fe;
    try {
      if (s.kind === "rng") {
        const r = await fe.rngRead(s.len, s.queue);
        if (r.len !== s.len) return `used.len ${r.len}, expected ${s.len}`;
        if (s.len >= 16 && r.data.every((b) => b === 0)) return "all zero bytes";
        return null;
      }
      if (s.where === "hot") return await this.#hotIo(s);
      if (s.kind === "write") {
        const r = await fe.blkWrite(s.sector, patternBytes(s.len, s.seed), s.queue);
        if (r.status !== Blk.S_OK) return `status ${r.status}`;
        return this.#checkDisk(s);
      }
      if (s.kind === "flush") {
        const r = await fe.blkFlush(s.queue);
        return r.status === Blk.S_OK ? null : `status ${r.status}`;
      }
      const r = await fe.blkRead(s.sector, s.len, s.queue);
      if (r.status !== Blk.S_OK) return `status ${r.status}`;
      const want = patternBytes(s.len, s.seed);
      const bad = r.data.findIndex((b, k) => b !== want[k]);
      return bad < 0 ? null : `read data differs from what was written at byte ${bad}`;
    } catch (e) {
      return (e as Error).message;
    }
  }

  #checkDisk(s: IoStep): string | null {
    const path = this.#env.diskPath;
    if (!path) return null;
    const want = patternBytes(s.len, s.seed);
    const got = readFileRange(path, s.sector * 512, s.len);
    const bad = got.findIndex((b, k) => b !== want[k]);
    return bad < 0 ? null : `the disk file differs from what was written at byte ${bad}`;
  }

  /** A blk request whose data buffer is in the hot-added region (mapped here as well). */
  async #hotIo(s: IoStep): Promise<string | null> {
    const L = this.#env.layout;
    const k = this.#ioSerial++ % 32;
    const ctl = L.ctl + 64 * k;
    const dataOff = (k * 64 * 1024) % (L.hot.size - s.len);
    const data = L.hot.gpa + dataOff;
    const ram = this.fe.ram;
    const hdr = ram.offset(ctl, 17);
    ram.view.setUint32(hdr, s.kind === "write" ? Blk.T_OUT : Blk.T_IN, true);
    ram.view.setUint32(hdr + 4, 0, true);
    ram.view.setBigUint64(hdr + 8, BigInt(s.sector), true);
    ram.view.setUint8(hdr + 16, 0xff);
    const hotBytes = this.fds.hotMap.bytes;
    if (s.kind === "write") hotBytes.set(patternBytes(s.len, s.seed), dataOff);
    const segs: Segment[] = [
      { gpa: ctl, len: 16, write: false },
      { gpa: data, len: s.len, write: s.kind !== "write" },
      { gpa: ctl + 16, len: 1, write: true },
    ];
    const q = this.fe.queues[s.queue];
    await this.fe.submit(q, segs);
    const status = ram.view.getUint8(hdr + 16);
    if (status !== Blk.S_OK) return `status ${status}`;
    if (s.kind === "write") return this.#checkDisk(s);
    const want = patternBytes(s.len, s.seed);
    const bad = hotBytes.subarray(dataOff, dataOff + s.len).findIndex((b, i) => b !== want[i]);
    return bad < 0 ? null : `read data differs at byte ${bad}`;
  }

  /** Drops the connection and every fd the case made. */
  async close(): Promise<void> {
    await this.fe.close();
    this.fds.close();
  }
}
