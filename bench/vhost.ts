/**
 * vhost-user-blk benchmark: 4 KiB random read and write at queue depth 1 and 32 on a 1 GiB file in
 * /dev/shm, `mpq vhost blk` and qemu-storage-daemon side by side in the same run, both driven by
 * the same TypeScript front-end (tests/helpers/vhost_frontend.ts) from this process, while each
 * back-end runs in its own process. Prints IOPS, p50/p99 latency, the back-end's CPU time per I/O
 * (/proc/PID/stat utime+stime), the driver's own CPU time per I/O (when it approaches the wall time
 * per I/O, the TypeScript driver is what limits the figure) and the mpq/qsd ratio.
 *
 * The driver is kept cheap: one reserved 3-descriptor chain per slot, rewritten in place; every
 * call drains the used ring, refills all free slots, publishes avail->idx once and kicks at most
 * once (EVENT_IDX decides). Latency runs from just before publish to when the driver sees the used
 * entry.
 *
 * Run alone: `deno run -A bench/vhost.ts [--seconds S] [--warmup S] [--size-mib N] [--wait call|poll|both]
 * [--repeat N]`.
 * @module
 */
import { parseArgs } from "node:util";
import { EventFd } from "../ffi/mod.ts";
import { Blk, Feature, type FrontendQueue, VhostUserFrontend } from "../tests/helpers/vhost_frontend.ts";
import { DescFlags } from "../tests/helpers/virtio_ring.ts";
import { type Backend, haveTool, startMpqVhost, startQsd } from "../tests/helpers/vhost_backends.ts";

/** One measured point. */
export interface LoadResult {
  rw: "randread" | "randwrite";
  depth: number;
  ios: number;
  seconds: number;
  iops: number;
  p50us: number;
  p99us: number;
  errors: number;
  /** Back-end CPU microseconds per I/O (user+system), NaN when unknown. */
  cpuUsPerIo: number;
  /** This driver's own CPU microseconds per I/O (near the wall time per I/O: the driver limits). */
  driverCpuUsPerIo: number;
  /** Front-end kicks and calls per I/O. */
  kicksPerIo: number;
  callsPerIo: number;
}

/** Options for runLoad. */
export interface LoadOptions {
  rw: "randread" | "randwrite";
  depth: number;
  /** Measured seconds. */
  seconds: number;
  /** Warm-up seconds (not counted). */
  warmup: number;
  /** Back-end pid for CPU accounting. */
  backendPid?: number;
  /** Request size (default 4096). */
  bs?: number;
  /** PRNG seed for offsets. */
  seed?: number;
  /**
   * How the driver waits for completions: "call" (default) sleeps on the call eventfd through the
   * reactor, as a guest with interrupts does; "poll" spins on used->idx with calls suppressed
   * (lower latency when the driver has a core of its own; it takes that core from the back-end
   * on a small machine).
   */
  wait?: "poll" | "call";
  /**
   * Call mode: keep the reactor looking (non-blocking epoll_wait) for this many microseconds after
   * a submission before it sleeps on a worker thread (default 50), which saves the thread hand-off
   * when the back-end answers quickly.
   */
  spinUs?: number;
}

const CLK_TCK = 100;

/** utime+stime of a process in seconds, from /proc/PID/stat (NaN if unreadable). */
export function processCpuSeconds(pid: number): number {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  } catch {
    return NaN;
  }
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

interface Slot {
  head: number;
  dataDesc: number;
  hdr: number; // memfd offset of the request header
  status: number; // memfd offset of the status byte
  submitted: number; // performance.now() at publish
}

/**
 * Closed-loop load on queue 0 of a started front-end: keeps `depth` requests in flight for
 * warmup+seconds and returns the figures of the measured window.
 */
export async function runLoad(fe: VhostUserFrontend, options: LoadOptions): Promise<LoadResult> {
  const q: FrontendQueue = fe.queues[0];
  const ring = q.ring;
  const ram = fe.ram;
  const bs = options.bs ?? 4096;
  const capacity = Number(fe.blkConfig.capacity);
  const blocks = Math.floor((capacity * 512) / bs);
  if (blocks < 1) throw new Error(`device of ${capacity} sectors is smaller than one ${bs}-byte block`);
  if (options.depth * 3 > ring.size) {
    throw new Error(`depth ${options.depth} needs ${options.depth * 3} descriptors, ring has ${ring.size}`);
  }
  const read = options.rw === "randread";
  const slots: Slot[] = [];
  for (let i = 0; i < options.depth; i++) {
    const ctl = ram.alloc(64, 64, 0);
    const data = ram.alloc(bs, 4096);
    ram.bytes(data, bs).set(crypto.getRandomValues(new Uint8Array(Math.min(bs, 65536))).subarray(0, bs));
    const head = ring.reserveChain([
      { gpa: ctl, len: 16, write: false },
      { gpa: data, len: bs, write: read },
      { gpa: ctl + 16, len: 1, write: true },
    ]);
    if (head === null) throw new Error("no free descriptors for the load slots");
    const ids = ring.chainOf(head);
    slots.push({
      head,
      dataDesc: ids[1],
      hdr: ram.offset(ctl, 17),
      status: ram.offset(ctl + 16, 1),
      submitted: 0,
    });
  }
  const byHead: (Slot | undefined)[] = [];
  for (const s of slots) byHead[s.head] = s;
  const view = ram.view;
  const mem = ram.mem;
  const sectorsPerBlock = bs / 512;
  const type = read ? Blk.T_IN : Blk.T_OUT;
  const dataFlags = DescFlags.NEXT | (read ? DescFlags.WRITE : 0);
  for (const s of slots) {
    view.setUint32(s.hdr, type, true);
    view.setUint32(s.hdr + 4, 0, true);
    ring.setDescFlags(s.dataDesc, dataFlags);
  }
  let rng = (options.seed ?? 0x9e3779b9) >>> 0 || 1;
  const lat = new Float64Array(4 << 20);
  let nlat = 0;
  let ios = 0;
  let errors = 0;
  let measuring = false;
  let stopping = false;
  let inFlight = 0;
  const kick0 = { kicks: 0, calls: 0n };
  let finish: () => void = () => {};
  const done = new Promise<void>((r) => (finish = r));

  const free: Slot[] = [];
  let lastSubmit = 0;
  const submitFree = () => {
    if (stopping || free.length === 0) return;
    const t = performance.now();
    for (const s of free) {
      rng ^= rng << 13;
      rng >>>= 0;
      rng ^= rng >>> 17;
      rng ^= rng << 5;
      rng >>>= 0;
      const sector = Math.floor((rng / 4294967296) * blocks) * sectorsPerBlock;
      view.setUint32(s.hdr + 8, sector % 4294967296, true);
      view.setUint32(s.hdr + 12, Math.floor(sector / 4294967296), true);
      mem[s.status] = 0xff;
      s.submitted = t;
      ring.submitHead(s.head);
    }
    inFlight += free.length;
    free.length = 0;
    lastSubmit = t;
    if (ring.publish()) fe.kickQueue(q);
  };
  q.onComplete = (id) => {
    const s = byHead[id];
    if (!s) return;
    inFlight--;
    if (mem[s.status] !== Blk.S_OK) errors++;
    if (measuring) {
      ios++;
      if (nlat < lat.length) lat[nlat++] = performance.now() - s.submitted;
    }
    free.push(s);
  };
  // Refill after every drain of the used ring (the call handler runs poll(), then this poller).
  const poll = options.wait === "poll";
  const spinMs = (options.spinUs ?? 50) / 1000;
  if (poll) ring.suppressCalls();
  const complete = q.onComplete;
  // Call mode: the call handler drains the used ring, then this poller refills. Poll mode: this
  // poller also drains the used ring and keeps the reactor spinning while requests are in flight.
  // What the ring looked like when requests stopped completing (lost call or lost kick?).
  const stuck = () =>
    `${options.rw} QD${options.depth}: ${inFlight} requests never completed (avail ${ring.availIdx}, ` +
    `device used ${ring.usedIdx()}, driver consumed ${ring.lastUsed}, avail_event ${ring.availEvent()}, ` +
    `used flags ${ring.usedFlags()}; ${q.kicks} kicks, ${q.calls} calls; ` +
    `${
      ring.usedIdx() !== ring.lastUsed
        ? "the device completed them but no call came"
        : "the device did not complete them"
    })`;
  const removePoller = fe.reactor.addPoller(() => {
    if (poll && ring.collect(complete!) > 0) ring.suppressCalls();
    if (free.length) submitFree();
    if (stopping && inFlight === 0) finish();
    return inFlight > 0 && (poll || performance.now() - lastSubmit < spinMs);
  });
  // The reactor may be asleep in epoll_wait with calls suppressed: wake it once so the poller runs.
  const wake = new EventFd({ label: "bench wake" });
  const wakeWatch = fe.reactor.add(wake.fd, { readable: true }, () => wake.drain());
  free.push(...slots);
  submitFree();
  wake.signal();
  await new Promise((r) => setTimeout(r, options.warmup * 1000));
  const cpu0 = options.backendPid ? processCpuSeconds(options.backendPid) : NaN;
  const drv0 = processCpuSeconds(Deno.pid);
  kick0.kicks = q.kicks;
  kick0.calls = q.calls;
  const t0 = performance.now();
  measuring = true;
  await new Promise((r) => setTimeout(r, options.seconds * 1000));
  measuring = false;
  const t1 = performance.now();
  const cpu1 = options.backendPid ? processCpuSeconds(options.backendPid) : NaN;
  const drv1 = processCpuSeconds(Deno.pid);
  const kicks = q.kicks - kick0.kicks;
  const calls = Number(q.calls - kick0.calls);
  stopping = true;
  if (inFlight === 0) finish();
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    done,
    new Promise((_, rej) => (timer = setTimeout(() => rej(new Error(stuck())), 10_000))),
  ]).finally(() => clearTimeout(timer));
  removePoller();
  wakeWatch.remove();
  wake.close();
  q.onComplete = null;
  if (poll) ring.armCall();
  for (const s of slots) ring.releaseChain(s.head);
  const sorted = lat.slice(0, nlat).sort();
  const seconds = (t1 - t0) / 1000;
  return {
    rw: options.rw,
    depth: options.depth,
    ios,
    seconds,
    iops: ios / seconds,
    p50us: percentile(sorted, 0.5) * 1000,
    p99us: percentile(sorted, 0.99) * 1000,
    errors,
    cpuUsPerIo: ((cpu1 - cpu0) * 1e6) / ios,
    driverCpuUsPerIo: ((drv1 - drv0) * 1e6) / ios,
    kicksPerIo: kicks / ios,
    callsPerIo: calls / ios,
  };
}

const POINTS: ReadonlyArray<{ rw: "randread" | "randwrite"; depth: number }> = [
  { rw: "randread", depth: 1 },
  { rw: "randread", depth: 32 },
  { rw: "randwrite", depth: 1 },
  { rw: "randwrite", depth: 32 },
];

/** The issue's targets: mpq/qsd IOPS at these depths. */
const TARGET: Record<number, number> = { 1: 2, 32: 5 };

type Wait = "call" | "poll";

/** A started back-end with a started front-end on it. */
interface Session {
  name: string;
  be: Backend | null;
  fe: VhostUserFrontend | null;
  error: Error | null;
  /** results[wait][point] = one LoadResult per repetition. */
  results: Record<Wait, LoadResult[][]>;
}

async function openSession(name: string, start: () => Promise<Backend>): Promise<Session> {
  const s: Session = {
    name,
    be: null,
    fe: null,
    error: null,
    results: { call: POINTS.map(() => []), poll: POINTS.map(() => []) },
  };
  try {
    s.be = await start();
    s.fe = await VhostUserFrontend.connect(s.be.socketPath, {
      queueSize: 256,
      eventIdx: true,
      memSize: 64 << 20,
      depth: 1,
      maxRequestBytes: 4096,
    });
    const info = await s.fe.handshake();
    if (!(info.features & Feature.RING_EVENT_IDX)) throw new Error(`${s.be.name} does not offer EVENT_IDX`);
    await s.fe.start();
  } catch (e) {
    s.error = e instanceof Error ? e : new Error(String(e));
  }
  return s;
}

async function closeSession(s: Session): Promise<void> {
  try {
    if (s.fe?.started) await s.fe.stop();
  } catch { /* reported through results */ }
  await s.fe?.close();
  await s.be?.stop();
}

function fmt(n: number, width: number, digits = 0): string {
  return (Number.isFinite(n) ? n.toFixed(digits) : "-").padStart(width);
}

/** The repetition with the median IOPS (its other figures come with it). */
export function medianRun(runs: LoadResult[]): LoadResult {
  const sorted = [...runs].sort((a, b) => a.iops - b.iops);
  return sorted[Math.floor((sorted.length - 1) / 2)];
}

/** Options of benchVhost. */
export interface BenchVhostOptions {
  /** Measured seconds per point and repetition (default 2). */
  seconds?: number;
  /** Warm-up seconds before each (default 0.5). */
  warmup?: number;
  /** File size in MiB (default 1024). */
  sizeMiB?: number;
  /** How the driver waits for completions (default both, one after the other). */
  wait?: Wait | "both";
  /** Repetitions of every point; the median by IOPS is printed (default 3). */
  repeat?: number;
}

/** Runs the vhost-user-blk benchmark and prints the table. */
export async function benchVhost(options: BenchVhostOptions = {}): Promise<void> {
  const waits: Wait[] = options.wait === "call" || options.wait === "poll"
    ? [options.wait]
    : ["call", "poll"];
  const seconds = options.seconds ?? 2;
  const warmup = options.warmup ?? 0.5;
  const repeat = Math.max(1, Math.floor(options.repeat ?? 3));
  const size = (options.sizeMiB ?? 1024) * 1024 * 1024;
  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "mpq-bench-vhost-" });
  const file = `${dir}/disk.img`;
  try {
    // Fill the file so reads hit real pages (tmpfs holes read as shared zero pages).
    const f = await Deno.open(file, { create: true, write: true, truncate: true });
    try {
      const chunk = crypto.getRandomValues(new Uint8Array(65536));
      const mib = new Uint8Array(1 << 20);
      for (let i = 0; i < mib.length; i += chunk.length) mib.set(chunk, i);
      for (let off = 0; off < size; off += mib.length) {
        let done = 0;
        while (done < mib.length) done += await f.write(mib.subarray(done));
      }
    } finally {
      f.close();
    }
    console.log(
      `vhost-user-blk: 4 KiB random I/O on a ${size >> 20} MiB file in /dev/shm; one TypeScript front-end ` +
        `with EVENT_IDX drives each back-end, one queue; ${seconds} s per point (+${warmup} s warm-up), ` +
        `median of ${repeat} by IOPS.\n` +
        `Both back-ends in their defaults: mpq vhost blk (engine auto = vmcopy on tmpfs, adaptive polling ` +
        `<= 32 us, writethrough) and qemu-storage-daemon (file driver, aio=threads, writeback).\n` +
        `Completions: "call" = the driver sleeps on the call eventfd after a 50 us spin, as a guest with ` +
        `interrupts; "poll" = the driver spins on the used ring with calls suppressed, as a polling guest.`,
    );
    // Both back-ends run side by side; the points alternate between them (mpq first, then qsd
    // first) so drifting load on a shared machine does not favour one of them.
    const sessions = [
      await openSession(
        "mpq",
        () => startMpqVhost("blk", `${dir}/mpq.sock`, { args: [`--blk-file=${file}`] }),
      ),
      haveTool("qemu-storage-daemon")
        ? await openSession("qsd", () => startQsd(file, `${dir}/qsd.sock`, { queues: 1 }))
        : {
          name: "qsd",
          be: null,
          fe: null,
          error: new Error("qemu-storage-daemon is not installed"),
          results: { call: [], poll: [] },
        },
    ];
    try {
      let turn = 0;
      for (let r = 0; r < repeat; r++) {
        for (const wait of waits) {
          for (let i = 0; i < POINTS.length; i++) {
            const order = turn++ % 2 === 0 ? sessions : [...sessions].reverse();
            for (const s of order) {
              if (s.error || !s.fe || !s.be) continue;
              try {
                s.results[wait][i].push(
                  await runLoad(s.fe, { ...POINTS[i], seconds, warmup, wait, backendPid: s.be.child.pid }),
                );
              } catch (e) {
                s.error = e instanceof Error ? e : new Error(String(e));
              }
            }
          }
        }
      }
    } finally {
      for (const s of sessions) await closeSession(s);
    }
    console.log(
      `${"back-end".padEnd(9)} ${"wait".padEnd(5)} ${"workload".padEnd(13)} ${"IOPS".padStart(9)} ` +
        `${"p50 us".padStart(8)} ${"p99 us".padStart(8)} ${"CPU us/IO".padStart(10)} ${
          "drv us/IO".padStart(10)
        } ${"kicks/IO".padStart(9)} ${"calls/IO".padStart(9)} errors`,
    );
    for (const s of sessions) {
      if (s.error) {
        console.log(`${s.name.padEnd(9)} FAILED: ${s.error.message}`);
        continue;
      }
      for (const wait of waits) {
        for (const runs of s.results[wait]) {
          const p = medianRun(runs);
          console.log(
            `${s.name.padEnd(9)} ${wait.padEnd(5)} ${`${p.rw} QD${p.depth}`.padEnd(13)} ${fmt(p.iops, 9)} ` +
              `${fmt(p.p50us, 8, 1)} ${fmt(p.p99us, 8, 1)} ${fmt(p.cpuUsPerIo, 10, 2)} ${
                fmt(p.driverCpuUsPerIo, 10, 2)
              } ${fmt(p.kicksPerIo, 9, 2)} ${fmt(p.callsPerIo, 9, 2)} ${
                runs.reduce((n, x) => n + x.errors, 0)
              }`,
          );
        }
      }
    }
    const [m, q] = sessions;
    if (!m.error && !q.error) {
      for (const wait of waits) {
        for (let i = 0; i < POINTS.length; i++) {
          const a = medianRun(m.results[wait][i]);
          const b = medianRun(q.results[wait][i]);
          const ratio = a.iops / b.iops;
          const target = TARGET[POINTS[i].depth];
          const each = m.results[wait][i].map((x, k) => (x.iops / q.results[wait][i][k].iops).toFixed(2));
          console.log(
            `ratio mpq/qsd ${wait.padEnd(5)} ${`${POINTS[i].rw} QD${POINTS[i].depth}`.padEnd(13)} IOPS x${
              ratio.toFixed(2)
            } (runs ${each.join(", ")})  p50 latency x${(a.p50us / b.p50us).toFixed(2)}  CPU/IO x${
              (a.cpuUsPerIo / b.cpuUsPerIo).toFixed(2)
            }  target x${target}: ${ratio >= target ? "met" : "MISSED"}`,
          );
        }
      }
    }
    const failed = sessions.filter((s) => s.error);
    if (failed.length) {
      throw new Error(`vhost benchmark: ${failed.map((s) => `${s.name}: ${s.error!.message}`).join("; ")}`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      seconds: { type: "string", default: "2" },
      warmup: { type: "string", default: "0.5" },
      "size-mib": { type: "string", default: "1024" },
      wait: { type: "string", default: "both" },
      repeat: { type: "string", default: "3" },
    },
  });
  if (values.wait !== "poll" && values.wait !== "call" && values.wait !== "both") {
    console.error(`--wait must be call, poll or both: got ${values.wait}`);
    Deno.exit(2);
  }
  for (const k of ["seconds", "warmup", "size-mib", "repeat"] as const) {
    if (!(Number(values[k]) > 0)) {
      console.error(`--${k} must be a positive number: got ${values[k]}`);
      Deno.exit(2);
    }
  }
  await benchVhost({
    seconds: Number(values.seconds),
    warmup: Number(values.warmup),
    sizeMiB: Number(values["size-mib"]),
    wait: values.wait,
    repeat: Number(values.repeat),
  });
}
