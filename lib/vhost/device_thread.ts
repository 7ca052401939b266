/**
 * A device thread of `mpq vhost serve --threads N`: a Deno Worker whose reactor sleeps in a
 * synchronous epoll_wait ("block" wake mode) and serves whole devices — listener, vhost-user
 * messages, rings and I/O — so the devices of one process spread over the cores and each kick runs
 * its callback straight from epoll_wait on its own thread. The control thread (the process's main
 * thread: control socket, metrics socket, signals) sends it requests; {@link threadMain} is the
 * worker side, {@link DeviceThread} the control side. Requests reach the worker between its
 * reactor's slices (at most BLOCK_SLICE_MS), so control operations take up to that long.
 * @module
 */
import { Reactor } from "../../ffi/mod.ts";
import type { DaemonActivity, VhostUserDaemon } from "./daemon.ts";
import { DeviceOpenError, openDevice, type OpenedDevice, serveOpened } from "./device_factory.ts";
import type { DeviceSpec } from "./device_spec.ts";
import { type MetricFamily, Metrics } from "./metrics.ts";
import { QueuePool } from "./queue_thread.ts";
import { DEVICE_THREAD_NAME } from "./thread_name.ts";

/** What `list` reports of a device (computed on its thread). */
export interface ThreadDeviceStatus extends DaemonActivity {
  id: string;
  describe: string;
}

/** Options a thread starts with. */
export interface ThreadOptions {
  pollUs?: number;
  trace?: boolean;
  /** Queue threads per multi-queue device (this thread's own pool: see queue_thread.ts). */
  queueThreads?: number;
  /** The program's entry module (the main thread's Deno.mainModule), to start queue threads. */
  entry?: string;
}

type Request =
  | { op: "init"; options: ThreadOptions }
  | { op: "add"; spec: DeviceSpec }
  | { op: "remove"; id: string; force: boolean }
  | { op: "status" }
  | { op: "metrics" }
  | { op: "summaries" }
  | { op: "stop" };

type Reply = { seq: number; ok: true; result: unknown } | {
  seq: number;
  ok: false;
  error: string;
  field?: string;
};

/** A device the thread serves. */
interface Served {
  opened: OpenedDevice;
  daemon: VhostUserDaemon;
}

/**
 * The worker side: runs until the control thread sends "stop", then closes every device.
 * (Called by main.ts when it runs as a Worker named DEVICE_THREAD_NAME.)
 */
export async function threadMain(): Promise<void> {
  const scope = globalThis as unknown as {
    onmessage: ((e: MessageEvent) => void) | null;
    postMessage(m: unknown): void;
    close(): void;
  };
  const log = (l: string) => console.error(l);
  const reactor = new Reactor({
    wake: "block",
    onError: (e) => log(`mpq vhost: ${(e as Error).message ?? e}`),
  });
  const devices = new Map<string, Served>();
  let options: ThreadOptions = {};
  let pool: QueuePool | null = null;
  const status = (s: Served): ThreadDeviceStatus => ({
    id: s.opened.spec.id,
    ...s.daemon.activity,
    describe: s.opened.describe,
  });
  const handle = async (r: Request): Promise<unknown> => {
    switch (r.op) {
      case "init":
        options = r.options;
        if ((options.queueThreads ?? 1) > 1) pool = new QueuePool(options.queueThreads!, options.entry);
        return null;
      case "add": {
        const opened = openDevice(r.spec);
        const daemon = serveOpened(opened, {
          reactor,
          pollUs: options.pollUs,
          trace: options.trace,
          log,
          queuePool: pool ?? undefined,
        });
        const id = r.spec.id;
        const s = { opened, daemon };
        devices.set(id, s);
        return status(s);
      }
      case "remove": {
        const s = devices.get(r.id);
        if (!s) throw new Error(`no device ${JSON.stringify(r.id)} on this thread`);
        if (s.daemon.connected && !r.force) {
          throw new Error(`${r.id} has a connected front-end: detach it first, or remove with force`);
        }
        devices.delete(r.id);
        await s.daemon.shutdown("device removed");
        return null;
      }
      case "status":
        return [...devices.values()].map(status);
      case "metrics":
        return Metrics.families([...devices.values()].map((s) => s.daemon.metrics));
      case "summaries":
        return [...devices.values()].map((s) => s.daemon.metrics.summary());
      case "stop":
        reactor.stop();
        return null;
    }
  };
  scope.onmessage = (e: MessageEvent) => {
    const { seq, request } = e.data as { seq: number; request: Request };
    handle(request).then(
      (result) => scope.postMessage({ seq, ok: true, result } satisfies Reply),
      (err) =>
        scope.postMessage(
          {
            seq,
            ok: false,
            error: (err as Error).message ?? String(err),
            field: err instanceof DeviceOpenError ? err.field : undefined,
          } satisfies Reply,
        ),
    );
  };
  try {
    await reactor.run();
  } finally {
    for (const s of devices.values()) s.daemon.close();
    devices.clear();
    await (pool as QueuePool | null)?.stop();
    reactor.close();
    scope.onmessage = null;
    scope.postMessage({ seq: -1, ok: true, result: "stopped" } satisfies Reply);
  }
}

/**
 * The control side of one device thread.
 * @example
 * ```ts ignore
 * const t = DeviceThread.start(0, { pollUs: 128 });
 * await t.add(spec);
 * await t.stop();
 * ```
 */
export class DeviceThread {
  readonly index: number;
  /** Devices placed on this thread. */
  readonly ids = new Set<string>();
  readonly #worker: Worker;
  #seq = 0;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  #stopped: Promise<void>;
  #stoppedResolve!: () => void;
  #dead: Error | null = null;

  private constructor(index: number, worker: Worker) {
    this.index = index;
    this.#worker = worker;
    this.#stopped = new Promise((r) => this.#stoppedResolve = r);
    worker.onmessage = (e: MessageEvent) => {
      const reply = e.data as Reply;
      if (reply.seq === -1) {
        this.#stoppedResolve();
        return;
      }
      const p = this.#pending.get(reply.seq);
      if (!p) return;
      this.#pending.delete(reply.seq);
      if (reply.ok) p.resolve(reply.result);
      else {
        const err = reply.field !== undefined
          ? new DeviceOpenError(reply.field, reply.error)
          : new Error(reply.error);
        p.reject(err);
      }
    };
    worker.onerror = (e: ErrorEvent) => {
      e.preventDefault();
      this.#dead = new Error(`device thread ${index} failed: ${e.message}`);
      for (const p of this.#pending.values()) p.reject(this.#dead);
      this.#pending.clear();
      this.#stoppedResolve();
    };
  }

  /** Starts a thread running this program's entry module as a device thread. */
  static async start(index: number, options: ThreadOptions): Promise<DeviceThread> {
    const worker = new Worker(Deno.mainModule, { type: "module", name: DEVICE_THREAD_NAME });
    const t = new DeviceThread(index, worker);
    await t.#call({ op: "init", options: { entry: Deno.mainModule, ...options } });
    return t;
  }

  #call(request: Request): Promise<unknown> {
    if (this.#dead) return Promise.reject(this.#dead);
    const seq = ++this.#seq;
    return new Promise((resolve, reject) => {
      this.#pending.set(seq, { resolve, reject });
      this.#worker.postMessage({ seq, request });
    });
  }

  /** Serves one more device on this thread. */
  async add(spec: DeviceSpec): Promise<ThreadDeviceStatus> {
    const st = await this.#call({ op: "add", spec }) as ThreadDeviceStatus;
    this.ids.add(spec.id);
    return st;
  }

  /** Stops serving a device (see VhostServer.remove). */
  async remove(id: string, force: boolean): Promise<void> {
    await this.#call({ op: "remove", id, force });
    this.ids.delete(id);
  }

  /** The status of every device on this thread. */
  status(): Promise<ThreadDeviceStatus[]> {
    return this.#call({ op: "status" }) as Promise<ThreadDeviceStatus[]>;
  }

  /** The metric families of every device on this thread. */
  metrics(): Promise<MetricFamily[]> {
    return this.#call({ op: "metrics" }) as Promise<MetricFamily[]>;
  }

  /** One summary line per device (SIGUSR1). */
  summaries(): Promise<string[]> {
    return this.#call({ op: "summaries" }) as Promise<string[]>;
  }

  /** Closes the thread's devices and ends it (waits at most `ms`, then terminates it). */
  async stop(ms = 10_000): Promise<void> {
    if (!this.#dead) {
      this.#call({ op: "stop" }).catch(() => {});
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([this.#stopped, new Promise((r) => timer = setTimeout(r, ms))]);
      clearTimeout(timer);
    }
    this.#worker.terminate();
  }
}
