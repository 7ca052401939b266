/**
 * Per-queue counters and a latency histogram for `mpq vhost`, rendered as Prometheus text and
 * served on a UNIX socket (`--metrics PATH`: connect, read until EOF).
 * @module
 */
import { listenUnix, type Reactor, type UnixListener, type Watch } from "../../ffi/mod.ts";

/** Histogram upper bounds in microseconds (Prometheus `le` is printed in seconds). */
export const LATENCY_BOUNDS_US = [
  5,
  10,
  25,
  50,
  100,
  250,
  500,
  1000,
  2500,
  5000,
  10000,
  50000,
  250000,
  1000000,
];

/** A metric computed when rendering (see Metrics.addSource). */
interface MetricSource {
  name: string;
  help: string;
  type: "gauge" | "counter";
  values: () => Array<[string, number]>;
}

/** Float64 slots of one queue's counters: requests, read bytes, write bytes, errors, latency sum, buckets. */
const QUEUE_SLOTS = 5 + LATENCY_BOUNDS_US.length + 1;

/**
 * Counters of one queue, in a Float64Array that may live in a SharedArrayBuffer: a queue served on
 * a queue thread (see queue_pool.ts) counts into the same memory the control thread renders. One
 * thread writes a queue's counters at a time (the one serving it). The hot path increments them
 * without allocating.
 */
export class QueueMetrics {
  readonly #v: Float64Array;
  /** Non-cumulative bucket counts; the last is +Inf. */
  readonly buckets: Float64Array;

  constructor(slots: Float64Array = new Float64Array(QUEUE_SLOTS)) {
    this.#v = slots;
    this.buckets = slots.subarray(5);
  }

  get requests(): number {
    return this.#v[0];
  }
  set requests(n: number) {
    this.#v[0] = n;
  }
  get readBytes(): number {
    return this.#v[1];
  }
  set readBytes(n: number) {
    this.#v[1] = n;
  }
  get writeBytes(): number {
    return this.#v[2];
  }
  set writeBytes(n: number) {
    this.#v[2] = n;
  }
  get errors(): number {
    return this.#v[3];
  }
  set errors(n: number) {
    this.#v[3] = n;
  }
  get latencySumUs(): number {
    return this.#v[4];
  }

  /** Records one completed request that took `us` microseconds. */
  observe(us: number): void {
    this.#v[4] += us;
    const b = LATENCY_BOUNDS_US;
    let i = 0;
    while (i < b.length && us > b[i]) i++;
    this.buckets[i]++;
  }
}

/** One metric family: its HELP and TYPE lines and its samples. */
export interface MetricFamily {
  name: string;
  head: string[];
  samples: string[];
}

/**
 * The metrics of one daemon.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const m = new Metrics("block", 2);
 * m.queue(0).requests++;
 * m.queue(0).observe(40); // one request that took 40 µs
 * assert.match(m.render(), /^mpq_vhost_requests_total\{device="block",queue="0"\} 1$/m);
 * ```
 */
export class Metrics {
  readonly device: string;
  readonly queues: QueueMetrics[] = [];
  connections = 0;
  readonly #sources: MetricSource[] = [];
  /** The queues' counters, then the broken-queue count: shareable with queue threads. */
  readonly shared: SharedArrayBuffer;
  readonly #broken: Int32Array;

  /**
   * A daemon's metrics; `shared` (another Metrics' `.shared`) makes the queue counters and the
   * broken-queue count the same memory as that one's (a queue thread counting for the daemon).
   */
  constructor(device: string, numQueues: number, shared?: SharedArrayBuffer) {
    this.device = device;
    const bytes = (numQueues * QUEUE_SLOTS + 1) * 8;
    if (shared && shared.byteLength !== bytes) {
      throw new RangeError(
        `shared metrics of ${shared.byteLength} bytes for ${numQueues} queues: expected ${bytes}`,
      );
    }
    this.shared = shared ?? new SharedArrayBuffer(bytes);
    for (let i = 0; i < numQueues; i++) {
      this.queues.push(new QueueMetrics(new Float64Array(this.shared, i * QUEUE_SLOTS * 8, QUEUE_SLOTS)));
    }
    this.#broken = new Int32Array(this.shared, numQueues * QUEUE_SLOTS * 8, 1);
  }

  /** Queues stopped because their ring broke the rules (counted by whichever thread served them). */
  get brokenQueues(): number {
    return Atomics.load(this.#broken, 0);
  }

  /** One more queue broke the rules. */
  countBroken(): void {
    Atomics.add(this.#broken, 0, 1);
  }

  /**
   * Adds a metric read when rendering: `values()` gives [extra labels, value] pairs (labels such as
   * `queue="0"`, or "" for the device as a whole).
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   *
   * const metrics = new Metrics("block", 1);
   * let windowUs = 8;
   * metrics.addSource("mpq_vhost_poll_window_seconds", "Busy-poll window.", "gauge", () => [
   *   ["", windowUs / 1e6],
   * ]);
   * windowUs = 32; // read when rendering
   * assert.match(metrics.render(), /^mpq_vhost_poll_window_seconds\{device="block"\} 0.000032$/m);
   * ```
   */
  addSource(
    name: string,
    help: string,
    type: "gauge" | "counter",
    values: () => Array<[string, number]>,
  ): void {
    if (this.#sources.some((x) => x.name === name)) return;
    this.#sources.push({ name, help, type, values });
  }

  /** The counters of queue `i`. */
  queue(i: number): QueueMetrics {
    return this.queues[i];
  }

  /** Prometheus text exposition format. */
  render(): string {
    return Metrics.renderAll([this]);
  }

  /**
   * Several daemons' metrics as one exposition (`mpq vhost serve`): each family's HELP and TYPE
   * once, then every daemon's samples, told apart by their `device` label.
   * @example
   * ```ts
   * import assert from "node:assert/strict";
   *
   * const text = Metrics.renderAll([new Metrics("block", 1), new Metrics("rng", 1)]);
   * assert.equal(text.match(/^# TYPE mpq_vhost_requests_total counter$/gm)?.length, 1);
   * assert.match(text, /^mpq_vhost_requests_total\{device="rng",queue="0"\} 0$/m);
   * ```
   */
  static renderAll(list: readonly Metrics[]): string {
    return Metrics.renderFamilies([Metrics.families(list)]);
  }

  /**
   * The metric families of several daemons as plain data (sent from a device thread to the
   * control thread, which merges them with renderFamilies).
   */
  static families(list: readonly Metrics[]): MetricFamily[] {
    const families = new Map<string, { head: string[]; samples: string[] }>();
    for (const m of list) m.#collect(families);
    return [...families.entries()].map(([name, f]) => ({ name, head: f.head, samples: f.samples }));
  }

  /** One exposition from families collected in several places: each family's HELP and TYPE once. */
  static renderFamilies(groups: readonly (readonly MetricFamily[])[]): string {
    const merged = new Map<string, { head: string[]; samples: string[] }>();
    for (const g of groups) {
      for (const f of g) {
        const m = merged.get(f.name);
        if (m) m.samples.push(...f.samples);
        else merged.set(f.name, { head: [...f.head], samples: [...f.samples] });
      }
    }
    const lines: string[] = [];
    for (const f of merged.values()) lines.push(...f.head, ...f.samples);
    return lines.join("\n") + "\n";
  }

  #collect(families: Map<string, { head: string[]; samples: string[] }>): void {
    const d = this.device;
    const family = (name: string, help: string, type: string): string[] => {
      let f = families.get(name);
      if (!f) {
        f = { head: [`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`], samples: [] };
        families.set(name, f);
      }
      return f.samples;
    };
    const counter = (name: string, help: string, get: (q: QueueMetrics) => number) => {
      const out = family(name, help, "counter");
      this.queues.forEach((q, i) => out.push(`${name}{device="${d}",queue="${i}"} ${get(q)}`));
    };
    counter("mpq_vhost_requests_total", "Requests completed.", (q) => q.requests);
    counter("mpq_vhost_read_bytes_total", "Bytes moved to the guest.", (q) => q.readBytes);
    counter("mpq_vhost_write_bytes_total", "Bytes moved from the guest.", (q) => q.writeBytes);
    counter("mpq_vhost_errors_total", "Requests completed with an error status.", (q) => q.errors);
    const hist = family(
      "mpq_vhost_request_latency_seconds",
      "Time from popping a request to completing it.",
      "histogram",
    );
    this.queues.forEach((q, i) => {
      let cum = 0;
      const labels = `device="${d}",queue="${i}"`;
      LATENCY_BOUNDS_US.forEach((b, k) => {
        cum += q.buckets[k];
        hist.push(`mpq_vhost_request_latency_seconds_bucket{${labels},le="${b / 1e6}"} ${cum}`);
      });
      cum += q.buckets[LATENCY_BOUNDS_US.length];
      hist.push(`mpq_vhost_request_latency_seconds_bucket{${labels},le="+Inf"} ${cum}`);
      hist.push(`mpq_vhost_request_latency_seconds_sum{${labels}} ${q.latencySumUs / 1e6}`);
      hist.push(`mpq_vhost_request_latency_seconds_count{${labels}} ${cum}`);
    });
    family("mpq_vhost_connections_total", "Front-end connections accepted.", "counter")
      .push(`mpq_vhost_connections_total{device="${d}"} ${this.connections}`);
    family("mpq_vhost_broken_queues_total", "Queues stopped because their ring broke the rules.", "counter")
      .push(`mpq_vhost_broken_queues_total{device="${d}"} ${this.brokenQueues}`);
    for (const src of this.#sources) {
      const out = family(src.name, src.help, src.type);
      for (const [labels, v] of src.values()) {
        out.push(`${src.name}{device="${d}"${labels ? `,${labels}` : ""}} ${v}`);
      }
    }
  }

  /** One line for SIGUSR1. */
  summary(): string {
    let req = 0, rd = 0, wr = 0, err = 0, lat = 0;
    for (const q of this.queues) {
      req += q.requests;
      rd += q.readBytes;
      wr += q.writeBytes;
      err += q.errors;
      lat += q.latencySumUs;
    }
    const avg = req ? (lat / req).toFixed(1) : "0";
    return `mpq vhost ${this.device}: ${req} requests, ${rd} bytes read, ${wr} bytes written, ${err} errors, ` +
      `avg latency ${avg} us, ${this.connections} connections, ${this.brokenQueues} broken queues`;
  }
}

/**
 * Serves `metrics.render()` to every connection on a UNIX socket, then closes it.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Reactor } from "../../ffi/mod.ts";
 *
 * const dir = Deno.makeTempDirSync();
 * const reactor = new Reactor();
 * const server = new MetricsServer(`${dir}/metrics.sock`, { reactor, metrics: new Metrics("rng", 1) });
 * const running = reactor.run();
 * const scraper = await Deno.connect({ transport: "unix", path: `${dir}/metrics.sock` });
 * const text = await new Response(scraper.readable).text(); // until the server closes it
 * assert.match(text, /^mpq_vhost_requests_total\{device="rng",queue="0"\} 0$/m);
 * server.close(); // the socket is unlinked
 * reactor.stop();
 * await running;
 * reactor.close();
 * Deno.removeSync(dir);
 * ```
 */
export class MetricsServer {
  readonly #listener: UnixListener;
  readonly #watch: Watch;

  constructor(
    path: string,
    options: { reactor: Reactor; metrics: Metrics | (() => string | Promise<string>) },
  ) {
    const { reactor, metrics } = options;
    const render = typeof metrics === "function" ? metrics : () => metrics.render();
    this.#listener = listenUnix(path);
    this.#watch = reactor.add(this.#listener.fd, { readable: true }, () => {
      for (;;) {
        const conn = this.#listener.accept();
        if (!conn) return;
        const send = (body: string) => {
          try {
            const text = new TextEncoder().encode(body);
            let off = 0;
            while (off < text.byteLength) {
              const n = conn.sendMsg(text.subarray(off));
              if (n === null || n === 0) break;
              off += n;
            }
          } catch {
            /* the scraper went away */
          } finally {
            conn.close();
          }
        };
        let out: string | Promise<string>;
        try {
          out = render();
        } catch (e) {
          out = `# metrics unavailable: ${(e as Error).message}\n`;
        }
        if (typeof out === "string") send(out);
        else out.then(send, (e) => send(`# metrics unavailable: ${(e as Error).message}\n`));
      }
    });
  }

  close(): void {
    this.#watch.remove();
    this.#listener.close();
  }
}
