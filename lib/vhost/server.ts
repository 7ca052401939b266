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
import { VhostUserDaemon } from "./daemon.ts";
import { openDevice, type OpenedDevice } from "./device_factory.ts";
import {
  checkUnique,
  type DeviceSpec,
  deviceSpecFromJson,
  formatDeviceArg,
  parseDeviceArg,
} from "./device_spec.ts";
import { Metrics, MetricsServer } from "./metrics.ts";

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
}

interface Served {
  opened: OpenedDevice;
  daemon: VhostUserDaemon;
  removing: boolean;
}

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
 * devices.forEach((d, index) => server.add(parseDeviceArg(d, { defaultQueues: 1, index })));
 * const running = server.run(); // until stop(), SIGTERM with { signals: true }, or the "stop" command
 * await server.remove("rng1"); // while the others serve
 * assert.deepEqual(server.list().map((d) => d.id), ["blk0"]);
 * server.stop();
 * await running;
 * server.close(); // every device, the control socket and the reactor
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export class VhostServer {
  readonly reactor: Reactor;
  readonly #opts: ServerOptions;
  readonly #log: (line: string) => void;
  readonly #devices = new Map<string, Served>();
  #metrics: MetricsServer | null = null;
  #control: ControlServer | null = null;
  #added = 0;

  constructor(options: ServerOptions = {}) {
    this.#opts = options;
    this.#log = options.log ?? ((l) => console.error(l));
    this.reactor = new Reactor({
      onError: (e) => this.#log(`mpq vhost: ${(e as Error).message ?? e}`),
      wake: options.wake,
    });
    try {
      if (options.metricsPath) {
        this.#metrics = new MetricsServer(options.metricsPath, {
          reactor: this.reactor,
          metrics: () => Metrics.renderAll([...this.#devices.values()].map((s) => s.daemon.metrics)),
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
        for (const s of this.#devices.values()) this.#log(s.daemon.metrics.summary());
      });
    }
  }

  /** The devices, in the order they were added. */
  list(): DeviceStatus[] {
    return [...this.#devices.values()].map((s) => this.#status(s));
  }

  #status(s: Served): DeviceStatus {
    const spec = s.opened.spec;
    const m = s.daemon.metrics;
    return {
      id: spec.id,
      type: spec.type,
      spec: formatDeviceArg(spec),
      listen: "socket" in spec.listen ? spec.listen.socket : `fd ${spec.listen.fd}`,
      connected: s.daemon.connected,
      connections: m.connections,
      requests: m.queues.reduce((n, q) => n + q.requests, 0),
      describe: s.opened.describe,
    };
  }

  /**
   * Opens and serves one more device; throws (leaving nothing open) when its id, socket or fd is
   * taken or what it names cannot be opened.
   */
  add(spec: DeviceSpec): DeviceStatus {
    checkUnique([...[...this.#devices.values()].map((s) => s.opened.spec), spec]);
    const opened = openDevice(spec);
    let daemon: VhostUserDaemon;
    try {
      const id = spec.id;
      daemon = new VhostUserDaemon(opened.device, opened.listener, {
        reactor: this.reactor,
        label: id,
        pollUs: this.#opts.pollUs,
        trace: this.#opts.trace,
        log: (l) => this.#log(l.replace(/^mpq vhost: /, `mpq vhost ${id}: `)),
      });
    } catch (e) {
      opened.listener.close();
      opened.device.close();
      throw e;
    }
    const served: Served = { opened, daemon, removing: false };
    this.#devices.set(spec.id, served);
    this.#added++;
    const st = this.#status(served);
    this.#log(`mpq vhost ${spec.id}: ${spec.type} ${opened.describe}, listening on ${st.listen}`);
    return st;
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
    if (s.daemon.connected && !options.force) {
      throw new Error(`${id} has a connected front-end: detach it first, or remove with force`);
    }
    s.removing = true;
    try {
      await s.daemon.shutdown("device removed");
    } finally {
      this.#devices.delete(id);
    }
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

  /** Closes every device, the control and metrics sockets and the reactor (after run() resolved). */
  close(): void {
    for (const s of this.#devices.values()) s.daemon.close();
    this.#devices.clear();
    this.#control?.close();
    this.#metrics?.close();
    this.reactor.close();
  }
}
