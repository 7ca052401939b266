/**
 * A vhost-user back-end daemon: one listening socket, one front-end connection at a time (the
 * next one waits in the backlog and is served when the current one goes away), a reactor, metrics,
 * optional busy-polling of the avail rings.
 * @module
 */
import { Reactor, type UnixListener, type UnixSocket, type Watch } from "../../ffi/mod.ts";
import type { VhostUserDevice } from "./backend.ts";
import { VhostUserConnection } from "./connection.ts";
import { VhostUserHandler } from "./handler.ts";
import { Metrics, MetricsServer } from "./metrics.ts";

/** Options of a daemon. */
export interface DaemonOptions {
  /** Serve Prometheus text on this UNIX socket path. */
  metricsPath?: string;
  /** Busy-poll the avail rings for this many microseconds after the last work (0: off). */
  pollUs?: number;
  /** Diagnostics (default console.error). */
  log?: (line: string) => void;
  /** Log every message. */
  trace?: boolean;
  /** Route SIGTERM/SIGINT (stop) and SIGUSR1 (summary) (default false; the CLI sets it). */
  signals?: boolean;
}

/**
 * @example
 * const daemon = new VhostUserDaemon(device, listenUnix(path), {});
 * await daemon.run();
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
  #lastWork = 0;

  constructor(device: VhostUserDevice, listener: UnixListener | null, options: DaemonOptions = {}) {
    this.device = device;
    this.#listener = listener;
    this.#opts = options;
    this.#log = options.log ?? ((l) => console.error(l));
    this.reactor = new Reactor({ onError: (e) => this.#log(`mpq vhost: ${(e as Error).message ?? e}`) });
    this.metrics = new Metrics(device.type, device.numQueues);
    if (options.metricsPath) {
      this.#metricsServer = new MetricsServer(options.metricsPath, {
        reactor: this.reactor,
        metrics: this.metrics,
      });
    }
    this.#watchListener();
    if ((options.pollUs ?? 0) > 0) this.#removePoller = this.reactor.addPoller(() => this.#poll());
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
    const polling = (this.#opts.pollUs ?? 0) > 0;
    const handler = new VhostUserHandler(this.device, { reactor: this.reactor, metrics: this.metrics }, {
      log: this.#log,
      // While busy-polling, a kick starts the poll window and further kicks are suppressed.
      onKick: polling
        ? (q) => {
          if (q.ready) q.suppressNotification();
          this.#lastWork = performance.now();
        }
        : undefined,
    });
    this.#handler = handler;
    this.#conn = new VhostUserConnection(sock, handler, {
      reactor: this.reactor,
      log: this.#log,
      trace: this.#opts.trace,
      onClose: (reason) => {
        this.#conn = null;
        this.#handler = null;
        this.#log(`mpq vhost: front-end disconnected (${reason})`);
        if (!this.reactor.stopping) this.#watchListener();
      },
    });
  }

  /**
   * Busy-polling: serve rings that have buffers without waiting for kicks (which are suppressed
   * meanwhile); after pollUs without work, ask for kicks again and let the reactor sleep.
   */
  #poll(): boolean {
    const h = this.#handler;
    if (!h) return false;
    let worked = false;
    for (const q of h.queues) {
      if (q.ready && q.hasWork()) {
        q.suppressNotification();
        h.process(q);
        worked = true;
      }
    }
    const now = performance.now();
    if (worked) this.#lastWork = now;
    const polling = (now - this.#lastWork) * 1000 < (this.#opts.pollUs ?? 0);
    if (!polling) {
      for (const q of h.queues) {
        if (q.suppressed && q.resumeNotification() && q.ready) {
          h.process(q);
          worked = true;
        }
      }
    }
    return worked || polling;
  }

  /** Runs until stop(). */
  run(): Promise<void> {
    return this.reactor.run();
  }

  /** Asks run() to return. */
  stop(): void {
    this.reactor.stop();
  }

  /** Closes the connection, listener, metrics socket, device and reactor (after run() resolved). */
  close(): void {
    this.#conn?.close("daemon stopping");
    this.#listenWatch?.remove();
    this.#listenWatch = null;
    this.#removePoller?.();
    this.#metricsServer?.close();
    this.#listener?.close();
    this.device.close();
    this.reactor.close();
  }
}
