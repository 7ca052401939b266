/**
 * The one place a {@link DeviceSpec} becomes a running device's parts: the device (its file opened,
 * its engine resolved) and the listening socket it is served on. Used by `mpq vhost blk|rng`,
 * `mpq vhost serve` and the control socket's `add`.
 * @module
 */
import {
  adoptListener,
  isListeningSocket,
  listenUnix,
  OwnedFd,
  type Reactor,
  type UnixListener,
} from "../../ffi/mod.ts";
import type { VhostUserDevice } from "./backend.ts";
import { VhostUserDaemon } from "./daemon.ts";
import type { DeviceSpec, Listen } from "./device_spec.ts";
import type { QueuePlacer } from "./split_handler.ts";
import { BlkDevice, type BlkShared, openBlkFile } from "./devices/blk.ts";
import { RngDevice } from "./devices/rng.ts";

/** A device and its listener, not yet served. */
export interface OpenedDevice {
  spec: DeviceSpec;
  device: VhostUserDevice;
  listener: UnixListener;
  /** One line for the log: the file, its size, durability and engine, where it listens. */
  describe: string;
}

/** A spec that cannot be opened: names the field (as the spec spells it) and why. */
export class DeviceOpenError extends Error {
  /** "file", "engine", "socket", "fd". */
  readonly field: string;
  constructor(field: string, message: string) {
    super(message);
    this.name = "DeviceOpenError";
    this.field = field;
  }
}

/**
 * Opens what a spec names. Nothing is left open when it throws.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseDeviceArg } from "./device_spec.ts";
 *
 * const dir = Deno.makeTempDirSync();
 * const defaults = { defaultQueues: 1, index: 0 };
 * const opened = openDevice(parseDeviceArg(`rng,socket=${dir}/rng0.sock`, defaults));
 * assert.equal(opened.describe, "getrandom(2)");
 * opened.listener.close(); // its path is removed
 * opened.device.close();
 * const missing = parseDeviceArg(`blk,file=${dir}/none.img,socket=${dir}/d.sock`, defaults);
 * assert.throws(() => openDevice(missing), { name: "DeviceOpenError", field: "file" });
 * Deno.removeSync(dir); // empty: nothing was left behind
 * ```
 */
export function openDevice(spec: DeviceSpec): OpenedDevice {
  const { device, describe } = createDevice(spec);
  try {
    return { spec, device, listener: openListener(spec.listen), describe };
  } catch (e) {
    device.close();
    throw e;
  }
}

/**
 * The device a spec names, without its listener (openDevice, and a queue thread's instance of a
 * device whose other queues another thread serves: `shared` is the first instance's
 * {@link BlkDevice.shared}, so both see the same allocation map).
 */
export function createDevice(
  spec: DeviceSpec,
  shared?: BlkShared,
): { device: VhostUserDevice; describe: string } {
  if (spec.type !== "blk") return { device: new RngDevice(), describe: "getrandom(2)" };
  let opened: { fd: OwnedFd; size: number };
  try {
    opened = openBlkFile(spec.file, spec);
  } catch (e) {
    throw new DeviceOpenError("file", `${spec.file}: ${(e as Error).message}`);
  }
  try {
    const blk = new BlkDevice(opened.fd, opened.size, { ...spec, shared });
    const helpers = blk.engine === "vmcopy"
      ? `, ${blk.ioThreads} helper thread${blk.ioThreads === 1 ? "" : "s"}`
      : "";
    const describe = `${spec.file}, ${blk.size} bytes, ${blk.writeback ? "writeback" : "writethrough"}, ` +
      `engine ${blk.engine} (${blk.engineReason})${helpers}`;
    return { device: blk, describe };
  } catch (e) {
    opened.fd.close();
    // "engine vmcopy: ...", "engine uring: ..."
    throw new DeviceOpenError("engine", (e as Error).message);
  }
}

/** How a device is served on a shared reactor (`mpq vhost serve`). */
export interface ServeOptions {
  reactor: Reactor;
  /** Queue threads for multi-queue devices (see queue_thread.ts). */
  queuePool?: QueuePlacer;
  pollUs?: number;
  trace?: boolean;
  /** Where its log lines go; they are prefixed with the device id. */
  log: (line: string) => void;
}

/**
 * Serves an opened device on a shared reactor, its metrics and log lines labelled with its id;
 * closes the device and its listener when that fails.
 */
export function serveOpened(opened: OpenedDevice, options: ServeOptions): VhostUserDaemon {
  const id = opened.spec.id;
  try {
    return new VhostUserDaemon(opened.device, opened.listener, {
      reactor: options.reactor,
      label: id,
      pollUs: options.pollUs,
      trace: options.trace,
      queueThreads: options.queuePool ? { pool: options.queuePool, spec: opened.spec } : undefined,
      log: (l) => options.log(l.replace(/^mpq vhost: /, `mpq vhost ${id}: `)),
    });
  } catch (e) {
    opened.listener.close();
    opened.device.close();
    throw e;
  }
}

/** Listens on a new socket path, or adopts an inherited listening socket (checked to be one). */
export function openListener(listen: Listen): UnixListener {
  if ("socket" in listen) {
    try {
      return listenUnix(listen.socket);
    } catch (e) {
      throw new DeviceOpenError("socket", `${listen.socket}: ${(e as Error).message}`);
    }
  }
  const owned = OwnedFd.unsafeAdopt(listen.fd, `fd ${listen.fd}`);
  try {
    if (!isListeningSocket(owned)) throw new Error("the socket is not listening");
    return adoptListener(owned);
  } catch (e) {
    owned.unsafeRelease();
    throw new DeviceOpenError("fd", `${listen.fd}: not a usable listening socket: ${(e as Error).message}`);
  }
}
