/**
 * A vhost-user back-end daemon: one listening socket, one front-end connection at a time (the
 * next one waits in the backlog and is served when the current one goes away), a reactor, metrics,
 * optional busy-polling of the avail rings.
 * @module
 */
import {
  Reactor,
  type ReactorOptions,
  type UnixListener,
  type UnixSocket,
  type Watch,
} from "../../ffi/mod.ts";
import type { VhostUserDevice } from "./backend.ts";
import { VhostUserConnection } from "./connection.ts";
import type { DeviceSpec } from "./device_spec.ts";
import { type MessageHandler, VhostUserHandler } from "./handler.ts";
import { Metrics, MetricsServer } from "./metrics.ts";
import { PollWindow } from "./poll_window.ts";
import { type MirrorLink, type QueueHost, type QueuePlacer, SplitHandler } from "./split_handler.ts";

/**
 * Default largest busy-poll window (µs). QEMU's IOThreads use 32: measured with vub-bench at QD1
 * and a driver that sleeps on interrupts, a driver's turnaround here is ~40-60 µs, so a 32 µs cap
 * never catches the next request (the window shrinks back and every request pays a wake-up), while
 * 128 catches it (randread 21K -> 59K IOPS, CPU per I/O 22 -> 17 µs); with a polling driver or at
 * QD32 the two are the same. Drivers slower than the cap get no polling: the window shrinks.
 */
export const DEFAULT_POLL_US = 128;

/** Options of a daemon. */
export interface DaemonOptions {
  /** Serve Prometheus text on this UNIX socket path. */
  metricsPath?: string;
  /**
   * Largest adaptive busy-poll window (µs) after the last request (default DEFAULT_POLL_US; 0 turns
   * polling off). The window adapts to the driver: see PollWindow.
   */
  pollUs?: number;
  /** Diagnostics (default console.error). */
  log?: (line: string) => void;
  /** Log every message. */
  trace?: boolean;
  /** Route SIGTERM/SIGINT (stop) and SIGUSR1 (summary) (default false; the CLI sets it). */
  signals?: boolean;
  /**
   * Run on this reactor, shared with other daemons (`mpq vhost serve`): the daemon then neither
   * runs nor closes it. Default: a reactor of its own.
   */
  reactor?: Reactor;
  /** The `device` label of its metrics (default the device type). */
  label?: string;
  /** How its own reactor sleeps (default "auto"; the CLI uses "block": see ReactorOptions.wake). */
  wake?: ReactorOptions["wake"];
  /**
   * Serve the queues of a multi-queue device on these queue threads too (see queue_thread.ts);
   * `spec` is what the device was made from (each queue thread makes its own instance).
   */
  queueThreads?: { pool: QueuePlacer; spec: DeviceSpec };
  /** Count into another daemon's metrics memory (a queue thread's mirror: Metrics.shared). */
  sharedMetrics?: SharedArrayBuffer;
}

/** A daemon's front-end and request counts. */
export interface DaemonActivity {
  connected: boolean;
  connections: number;
  requests: number;
}

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { connectUnix, listenUnix } from "../../ffi/mod.ts";
 * import { RngDevice } from "./devices/rng.ts";
 *
 * const dir = Deno.makeTempDirSync();
 * const lines: string[] = [];
 * const daemon = new VhostUserDaemon(new RngDevice(), listenUnix(`${dir}/rng.sock`), {
 *   log: (line) => lines.push(line), // default console.error
 * });
 * const running = daemon.run(); // until stop() (SIGTERM and SIGINT with { signals: true })
 * const frontEnd = connectUnix(`${dir}/rng.sock`); // QEMU's -chardev socket,path=...
 * while (!daemon.connected) await new Promise((r) => setTimeout(r, 1));
 * daemon.stop();
 * await running;
 * daemon.close(); // the connection, the listener (its path removed), the device and the reactor
 * assert.deepEqual(lines, ["mpq vhost: front-end disconnected (daemon stopping)"]);
 * frontEnd.close();
 * Deno.removeSync(dir);
 * ```
 */
export class VhostUserDaemon {
  readonly reactor: Reactor;
  readonly metrics: Metrics;
  readonly device: VhostUserDevice;
  readonly #listener: UnixListener | null;
  readonly #opts: DaemonOptions;
  readonly #log: (line: string) => void;
  #listenWatch: Watch | null = null;
  #conn: VhostUserConnection | null = null;
  #handler: VhostUserHandler | null = null;
  #metricsServer: MetricsServer | null = null;
  #removePoller: (() => void) | null = null;
  readonly #window: PollWindow | null;
  readonly #ownReactor: boolean;
  #closed = false;
  /** Resolves when the current connection (if any) has closed and drained. */
  #connClosed: Promise<void> = Promise.resolve();
  #connClosedResolve: (() => void) | null = null;
  /** Per queue: the queue thread's mirror serving it (null: this thread); made on first connect. */
  #owners: (MirrorLink | null)[] | null = null;

  constructor(device: VhostUserDevice, listener: UnixListener | null, options: DaemonOptions = {}) {
    this.device = device;
    this.#listener = listener;
    this.#opts = options;
    this.#log = options.log ?? ((l) => console.error(l));
    this.#ownReactor = options.reactor === undefined;
    this.reactor = options.reactor ??
      new Reactor({
        onError: (e) => this.#log(`mpq vhost: ${(e as Error).message ?? e}`),
        wake: options.wake,
      });
    this.metrics = new Metrics(options.label ?? device.type, device.numQueues, options.sharedMetrics);
    if (options.metricsPath) {
      this.#metricsServer = new MetricsServer(options.metricsPath, {
        reactor: this.reactor,
        metrics: this.metrics,
      });
    }
    this.#watchListener();
    const maxUs = options.pollUs ?? DEFAULT_POLL_US;
    this.#window = maxUs > 0 ? new PollWindow(maxUs) : null;
    if (this.#window) this.#removePoller = this.reactor.addPoller(() => this.#poll());
    const window = this.#window;
    this.metrics.addSource(
      "mpq_vhost_poll_window_seconds",
      "The adaptive busy-poll window after the last request (0: kicks only).",
      "gauge",
      () => [["", (window?.windowUs ?? 0) / 1e6]],
    );
    if (options.signals) {
      this.reactor.onSignal("SIGTERM", () => this.stop());
      this.reactor.onSignal("SIGINT", () => this.stop());
      this.reactor.onSignal("SIGUSR1", () => this.#log(this.metrics.summary()));
    }
  }

  /** Whether a front-end is connected. */
  get connected(): boolean {
    return this.#conn !== null;
  }

  /** What `mpq vhost serve`'s list reports of the device while it serves. */
  get activity(): DaemonActivity {
    const m = this.metrics;
    return {
      connected: this.connected,
      connections: m.connections,
      requests: m.queues.reduce((n, q) => n + q.requests, 0),
    };
  }

  #watchListener(): void {
    const l = this.#listener;
    if (!l || this.#listenWatch) return;
    this.#listenWatch = this.reactor.add(l.fd, { readable: true }, () => {
      const sock = l.accept();
      if (sock) this.serve(sock);
    });
  }

  /** Serves one connected front-end (accepted, or one end of a socketpair in tests). */
  serve(sock: UnixSocket): void {
    if (this.#conn) {
      this.#log("mpq vhost: a front-end is already connected; refusing another");
      sock.close();
      return;
    }
    // One front-end at a time: later ones wait in the listen backlog.
    this.#listenWatch?.remove();
    this.#listenWatch = null;
    this.metrics.connections++;
    const handler = this.#newHandler();
    this.#handler = handler;
    this.#connClosed = new Promise((r) => this.#connClosedResolve = r);
    this.#conn = new VhostUserConnection(sock, this.#split(handler), {
      reactor: this.reactor,
      log: this.#log,
      trace: this.#opts.trace,
      onClose: (reason) => {
        this.#conn = null;
        this.#handler = null;
        this.#log(`mpq vhost: front-end disconnected (${reason})`);
        this.#connClosedResolve?.();
        if (!this.reactor.stopping && !this.#closed) this.#watchListener();
      },
    });
  }

  #newHandler(): VhostUserHandler {
    const window = this.#window;
    return new VhostUserHandler(this.device, { reactor: this.reactor, metrics: this.metrics }, {
      log: this.#log,
      // With polling, a kick ends a sleep (the window adapts to how long it was), starts a poll
      // window, and further kicks are suppressed until the window runs out.
      onKick: window
        ? (q) => {
          if (q.ready) q.suppressNotification();
          const now = performance.now();
          window.woken(now);
          window.work(now);
        }
        : undefined,
    });
  }

  /** The connection's handler: this one alone, or split with queue threads' mirrors. */
  #split(local: VhostUserHandler): MessageHandler {
    const qt = this.#opts.queueThreads;
    if (!qt || this.device.numQueues < 2 || qt.pool.size < 2) return local;
    if (!this.#owners) {
      const links = new Map<QueueHost, MirrorLink>();
      this.#owners = qt.pool.place(this.device.numQueues, this.reactor).map((t) => {
        if (!t) return null;
        let link = links.get(t);
        if (!link) {
          const key = t.attach({
            spec: qt.spec,
            label: this.metrics.device,
            metrics: this.metrics.shared,
            shared: this.device.shared,
            pollUs: this.#opts.pollUs,
            trace: this.#opts.trace,
          });
          link = { thread: t, key };
          links.set(t, link);
        }
        return link;
      });
      const owners = this.#owners;
      this.metrics.addSource(
        "mpq_vhost_queue_thread",
        "The thread serving the queue: 0 the device's own, N queue thread N-1.",
        "gauge",
        () => owners.map((l, i) => [`queue="${i}"`, l ? l.thread.index + 1 : 0]),
      );
    }
    const links = new Set(this.#owners.filter((l): l is MirrorLink => l !== null));
    for (const l of links) l.thread.connect(l.key).catch(() => {}); // a failure shows on the first message
    return new SplitHandler(local, this.#owners, this.#log);
  }

  /**
   * A queue thread's side of a device (see queue_thread.ts): a handler for the messages another
   * thread's connection forwards, polled like a connection's.
   */
  attachMirror(): VhostUserHandler {
    const h = this.#newHandler();
    this.#handler = h;
    return h;
  }

  /** The forwarding connection went away: the mirror's rings stop and drain. */
  async detachMirror(): Promise<void> {
    const h = this.#handler;
    this.#handler = null;
    await h?.close();
  }

  /** The adaptive busy-poll window (null when polling is off). */
  get pollWindow(): PollWindow | null {
    return this.#window;
  }

  /**
   * Busy-polling (a reactor poller): while the window is open, serve rings that have buffers
   * without waiting for kicks (suppressed meanwhile); when it closes, ask for kicks again and let
   * the reactor sleep.
   */
  #poll(): boolean {
    const h = this.#handler;
    const w = this.#window!;
    if (!h) return false;
    let worked = false;
    if (!w.asleep) {
      for (const q of h.queues) {
        if (q.ready && q.hasWork()) {
          q.suppressNotification();
          h.process(q);
          worked = true;
        }
      }
    }
    const now = performance.now();
    if (worked) {
      w.work(now);
      return true;
    }
    if (w.keepPolling(now)) return true;
    for (const q of h.queues) {
      // Buffers that raced in while kicks were off: serve them and keep polling.
      if (q.suppressed && q.resumeNotification() && q.ready) {
        q.suppressNotification();
        h.process(q);
        worked = true;
      }
    }
    if (worked) w.work(now);
    return worked;
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
   * Closes the connection, listener, metrics socket, device and (its own) reactor, after run()
   * resolved.
   */
  close(): void {
    this.#closed = true;
    this.#conn?.close("daemon stopping");
    this.#release();
  }

  #release(): void {
    for (const l of new Set(this.#owners ?? [])) l?.thread.detach(l.key).catch(() => {});
    this.#owners = null;
    this.#listenWatch?.remove();
    this.#listenWatch = null;
    this.#removePoller?.();
    this.#removePoller = null;
    this.#metricsServer?.close();
    this.#metricsServer = null;
    this.#listener?.close();
    this.device.close();
    if (this.#ownReactor) this.reactor.close();
  }

  /**
   * Shuts the daemon down while its (shared) reactor keeps running: stops accepting, disconnects
   * the front-end, waits until the device's in-flight requests drained, then releases everything.
   */
  async shutdown(reason = "device removed"): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#listenWatch?.remove();
    this.#listenWatch = null;
    this.#conn?.close(reason);
    await this.#connClosed;
    this.#release();
  }
}
