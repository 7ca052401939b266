/**
 * `mpq vhost serve`: many vhost-user devices in one process, on one reactor. Each device keeps the
 * single-device conventions (its own socket or inherited fd, one front-end at a time with
 * reconnection, inflight tracking, its own poll window and metrics labelled with its id); devices
 * are added and removed while the others serve, from the command line, a JSON file or the control
 * socket (qemu-storage-daemon's block-export-add/del are the model).
 * @module
 */
import { Reactor, type ReactorOptions } from "../../ffi/mod.ts";
import { type ControlCommand, ControlServer } from "./control.ts";
import type { VhostUserDaemon } from "./daemon.ts";
import { openDevice, type OpenedDevice, serveOpened } from "./device_factory.ts";
import { DeviceThread, type ThreadDeviceStatus } from "./device_thread.ts";
import {
  checkUnique,
  type DeviceSpec,
  deviceSpecFromJson,
  formatDeviceArg,
  parseDeviceArg,
} from "./device_spec.ts";
import { Metrics, MetricsServer } from "./metrics.ts";
import { QueuePool } from "./queue_thread.ts";

/** Options of a server. */
export interface ServerOptions {
  /** Serve every device's metrics (labelled with the device id) on this UNIX socket. */
  metricsPath?: string;
  /** The JSON-lines control socket (list, add, remove, stop). */
  controlPath?: string;
  /** Largest adaptive busy-poll window per device, µs (0: off). */
  pollUs?: number;
  /** Diagnostics (default console.error). */
  log?: (line: string) => void;
  /** Log every vhost-user message. */
  trace?: boolean;
  /** Route SIGTERM/SIGINT (stop) and SIGUSR1 (summaries). */
  signals?: boolean;
  /** Queues of a blk device added without num-queues (default 1). */
  defaultQueues?: number;
  /** How the reactor sleeps (default "auto"; the CLI uses "block": see ReactorOptions.wake). */
  wake?: ReactorOptions["wake"];
  /**
   * Device threads (Workers, each sleeping in its own epoll_wait): devices are spread over them,
   * the fewest first. 0 (default): every device on this thread's reactor.
   */
  threads?: number;
  /**
   * Threads serving one multi-queue device's queues, the device's own included (default 1: none;
   * the CLI defaults to the CPU count). See queue_thread.ts.
   */
  queueThreads?: number;
}

/** What `list` says of a device. */
export interface DeviceStatus {
  id: string;
  type: "blk" | "rng";
  /** The `--device` text of its spec. */
  spec: string;
  /** The socket path, or "fd N". */
  listen: string;
  connected: boolean;
  connections: number;
  requests: number;
  describe: string;
  /** The device thread serving it (with --threads). */
  thread?: number;
}

/** A device served on this thread's reactor, or on a device thread. */
type Served =
  & { spec: DeviceSpec; describe: string; removing: boolean }
  & ({ daemon: VhostUserDaemon; thread: null } | { daemon: null; thread: DeviceThread });

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseDeviceArg } from "./device_spec.ts";
 *
 * const dir = Deno.makeTempDirSync();
 * Deno.writeFileSync(`${dir}/disk.img`, new Uint8Array(1 << 20));
 * const server = new VhostServer({ controlPath: `${dir}/vhost.ctl`, log: () => {} }); // default: stderr
 * const devices = [`blk,file=${dir}/disk.img,socket=${dir}/d0.sock`, `rng,socket=${dir}/r1.sock`];
 * for (const [index, d] of devices.entries()) await server.add(parseDeviceArg(d, { defaultQueues: 1, index }));
 * const running = server.run(); // until stop(), SIGTERM with { signals: true }, or the "stop" command
 * await server.remove("rng1"); // while the others serve
 * assert.deepEqual((await server.list()).map((d) => d.id), ["blk0"]);
 * server.stop();
 * await running;
 * await server.close(); // every device, the control socket and the reactor
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export class VhostServer {
  readonly reactor: Reactor;
  readonly #opts: ServerOptions;
  readonly #log: (line: string) => void;
  readonly #devices = new Map<string, Served>();
  readonly #threads: DeviceThread[] = [];
  #threadsStarting: Promise<void> | null = null;
  #metrics: MetricsServer | null = null;
  #control: ControlServer | null = null;
  #added = 0;
  readonly #queuePool: QueuePool | null;

  constructor(options: ServerOptions = {}) {
    this.#opts = options;
    this.#log = options.log ?? ((l) => console.error(l));
    this.#queuePool = (options.queueThreads ?? 1) > 1 ? new QueuePool(options.queueThreads!) : null;
    this.reactor = new Reactor({
      onError: (e) => this.#log(`mpq vhost: ${(e as Error).message ?? e}`),
      wake: options.wake,
    });
    try {
      if (options.metricsPath) {
        this.#metrics = new MetricsServer(options.metricsPath, {
          reactor: this.reactor,
          metrics: () => this.#renderMetrics(),
        });
      }
      if (options.controlPath) {
        this.#control = new ControlServer(options.controlPath, {
          reactor: this.reactor,
          commands: this.#commands(),
          log: this.#log,
        });
      }
    } catch (e) {
      this.#metrics?.close();
      this.reactor.close();
      throw e;
    }
    if (options.signals) {
      this.reactor.onSignal("SIGTERM", () => this.stop());
      this.reactor.onSignal("SIGINT", () => this.stop());
      this.reactor.onSignal("SIGUSR1", () => {
        for (const s of this.#devices.values()) if (s.daemon) this.#log(s.daemon.metrics.summary());
        for (const t of this.#threads) t.summaries().then((ls) => ls.forEach(this.#log), () => {});
      });
    }
  }

  #renderMetrics(): string | Promise<string> {
    const local = Metrics.families(
      [...this.#devices.values()].flatMap((s) => s.daemon ? [s.daemon.metrics] : []),
    );
    if (this.#threads.length === 0) return Metrics.renderFamilies([local]);
    return Promise.all(this.#threads.map((t) => t.metrics())).then((g) =>
      Metrics.renderFamilies([local, ...g])
    );
  }

  /** The devices, in the order they were added. */
  async list(): Promise<DeviceStatus[]> {
    const onThreads = new Map<string, ThreadDeviceStatus>();
    for (const t of this.#threads) for (const st of await t.status()) onThreads.set(st.id, st);
    return [...this.#devices.values()].map((s) => {
      const spec = s.spec;
      const live = s.daemon?.activity ?? onThreads.get(spec.id) ??
        { connected: false, connections: 0, requests: 0 };
      return {
        id: spec.id,
        type: spec.type,
        spec: formatDeviceArg(spec),
        listen: "socket" in spec.listen ? spec.listen.socket : `fd ${spec.listen.fd}`,
        connected: live.connected,
        connections: live.connections,
        requests: live.requests,
        describe: s.describe,
        ...(s.thread ? { thread: s.thread.index } : {}),
      };
    });
  }

  async #startThreads(): Promise<void> {
    const n = this.#opts.threads ?? 0;
    if (n <= 0 || this.#threads.length > 0) return;
    this.#threadsStarting ??= (async () => {
      for (let i = 0; i < n; i++) {
        this.#threads.push(
          await DeviceThread.start(i, {
            pollUs: this.#opts.pollUs,
            trace: this.#opts.trace,
            queueThreads: this.#opts.queueThreads,
          }),
        );
      }
    })();
    await this.#threadsStarting;
  }

  /**
   * Opens and serves one more device (on the device thread with the fewest devices, when there are
   * threads); throws (leaving nothing open) when its id, socket or fd is taken or what it names
   * cannot be opened.
   */
  async add(spec: DeviceSpec): Promise<DeviceStatus> {
    checkUnique([...[...this.#devices.values()].map((s) => s.spec), spec]);
    await this.#startThreads();
    // Taken now, so a concurrent add of the same id or socket is refused while this one opens.
    const placeholder: Served = { spec, describe: "", removing: true, daemon: null, thread: null as never };
    this.#devices.set(spec.id, placeholder);
    let served: Served;
    try {
      if (this.#threads.length > 0) {
        const thread = this.#threads.reduce((a, b) => b.ids.size < a.ids.size ? b : a);
        const st = await thread.add(spec);
        served = { spec, describe: st.describe, removing: false, daemon: null, thread };
      } else {
        const opened = openDevice(spec);
        served = {
          spec,
          describe: opened.describe,
          removing: false,
          daemon: this.#serveHere(opened),
          thread: null,
        };
      }
    } catch (e) {
      this.#devices.delete(spec.id);
      throw e;
    }
    this.#devices.set(spec.id, served);
    this.#added++;
    const where = served.thread ? ` (thread ${served.thread.index})` : "";
    const listen = "socket" in spec.listen ? spec.listen.socket : `fd ${spec.listen.fd}`;
    this.#log(`mpq vhost ${spec.id}: ${spec.type} ${served.describe}, listening on ${listen}${where}`);
    return (await this.list()).find((d) => d.id === spec.id)!;
  }

  #serveHere(opened: OpenedDevice): VhostUserDaemon {
    const o = this.#opts;
    return serveOpened(opened, {
      reactor: this.reactor,
      pollUs: o.pollUs,
      trace: o.trace,
      log: this.#log,
      queuePool: this.#queuePool ?? undefined,
    });
  }

  /**
   * Stops serving a device: refused while a front-end is connected unless `force` (then it is
   * disconnected); resolves once its in-flight requests drained and everything is closed.
   */
  async remove(id: string, options: { force?: boolean } = {}): Promise<void> {
    const s = this.#devices.get(id);
    if (!s || s.removing) {
      throw new Error(
        `no device ${JSON.stringify(id)} (devices: ${[...this.#devices.keys()].join(", ") || "none"})`,
      );
    }
    if (s.daemon?.connected && !options.force) {
      throw new Error(`${id} has a connected front-end: detach it first, or remove with force`);
    }
    s.removing = true;
    try {
      if (s.daemon) await s.daemon.shutdown("device removed");
      else await s.thread.remove(id, options.force === true);
    } catch (e) {
      s.removing = false;
      throw e;
    }
    this.#devices.delete(id);
    this.#log(`mpq vhost ${id}: removed`);
  }

  /** How many devices are served. */
  get size(): number {
    return this.#devices.size;
  }

  #commands(): Record<string, ControlCommand> {
    const defaults = () => ({ defaultQueues: this.#opts.defaultQueues ?? 1, index: this.#added });
    return {
      list: () => this.list(),
      add: (args) => {
        const d = args.device ?? args;
        return this.add(
          typeof d === "string" ? parseDeviceArg(d, defaults()) : deviceSpecFromJson(d, defaults()),
        );
      },
      remove: async (args) => {
        if (typeof args.id !== "string") throw new Error(`id: expected a device id string`);
        if (args.force !== undefined && typeof args.force !== "boolean") {
          throw new Error("force: expected true or false");
        }
        await this.remove(args.id, { force: args.force === true });
        return { removed: args.id };
      },
      stop: () => {
        // Reply first: the reactor stops after this turn.
        setTimeout(() => this.stop(), 0);
        return { stopping: true };
      },
    };
  }

  /** Runs until stop(). */
  run(): Promise<void> {
    return this.reactor.run();
  }

  /** Asks run() to return. */
  stop(): void {
    this.reactor.stop();
  }

  /**
   * Closes every device (and device thread), the control and metrics sockets and the reactor
   * (after run() resolved).
   */
  async close(): Promise<void> {
    await this.#threadsStarting?.catch(() => {});
    for (const s of this.#devices.values()) s.daemon?.close();
    await Promise.all([...this.#threads.map((t) => t.stop()), this.#queuePool?.stop()]);
    this.#threads.length = 0;
    this.#devices.clear();
    this.#control?.close();
    this.#metrics?.close();
    this.reactor.close();
  }
}
