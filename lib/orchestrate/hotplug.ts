/**
 * Hot-plug and hot-unplug while the guest runs (`mpq ctl SOCKET add|remove`):
 * - vhost-user-blk / vhost-user-rng with an mpq back-end: the VM's `mpq vhost serve` gets the
 *   device through its control socket (a serve is started if the VM had none), mpq connects to the
 *   device's socket and hands QEMU the connected fd (`getfd` with SCM_RIGHTS), then `chardev-add`
 *   with that fd and `device_add`;
 * - remote (x-remote) PCI devices: a new socketpair, the remote QEMU process on one end, the other
 *   given to QEMU with `getfd` and `device_add x-pci-proxy-dev,fd=NAME`;
 * - ivshmem devices: an mpq ivshmem server, `chardev-add` on its socket, `device_add`.
 * Unplug: `device_del`, wait for DEVICE_DELETED, `chardev-remove`, stop the back-end.
 * Every step that succeeded is undone when a later one fails (no half-added chardev, no stray
 * process); the error names the step.
 * @module
 */
import { connectUnix } from "../../ffi/mod.ts";
import { controlRequest } from "../cli/control_client.ts";
import { isListening, type RunningChild, type Vm } from "./launch.ts";
import { ivshmemProcess, remoteProcess, type Resource } from "./plan.ts";
import type { QmpClient } from "./qmp.ts";
import { type Device, validateTopology } from "./topology.ts";

/** How long a hot-unplug waits for the guest to release the device (DEVICE_DELETED). */
export const UNPLUG_TIMEOUT_MS = 15_000;

/** A hot-plug step that failed: names the device and the step. */
export class HotplugError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "HotplugError";
  }
}

/** What hot-plug needs of the running VM. */
export interface HotplugContext {
  vm: Vm;
  /** argv prefix that runs mpq itself. */
  self: readonly string[];
  /** The VM's QEMU binary (for remote processes). */
  qemu: string;
  log: (line: string) => void;
  /** A device was added or removed (control-socket events). */
  changed?: (what: "added" | "removed", id: string) => void;
}

/** A device added while the VM runs: what to undo to remove it. */
interface Plugged {
  device: Device;
  /** A back-end process started for it alone (remote, ivshmem). */
  child?: RunningChild;
  resources: Resource[];
  /** Added to the VM's `mpq vhost serve`. */
  viaServe: boolean;
  chardev: boolean;
}

/**
 * The devices of one VM that can change while it runs: those of the topology and the ones added.
 * @example
 * ```ts ignore
 * const hp = new Hotplug(ctx, topology.devices.map((d) => d.id));
 * await hp.add({ type: "vhost-user-blk", id: "vblk9", backend: { mpq: { file: "/d.img" } } });
 * await hp.remove("vblk9");
 * ```
 */
export class Hotplug {
  readonly #ctx: HotplugContext;
  readonly #ids: Set<string>;
  readonly #plugged = new Map<string, Plugged>();
  #serve: RunningChild | null = null;
  #busy: Promise<unknown> = Promise.resolve();

  constructor(ctx: HotplugContext, topologyIds: Iterable<string>) {
    this.#ctx = ctx;
    this.#ids = new Set(topologyIds);
  }

  /** Ids of the devices added at runtime. */
  get added(): string[] {
    return [...this.#plugged.keys()];
  }

  /** One change at a time: QMP fd names and the serve process are shared. */
  #serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.#busy.then(fn, fn);
    this.#busy = next.catch(() => {});
    return next;
  }

  /** Validates a device as a topology would (field paths in errors) and adds it. */
  add(input: unknown): Promise<Device> {
    return this.#serial(() => this.#add(input));
  }

  /**
   * Removes a device added at runtime; waits up to `timeoutMs` (default UNPLUG_TIMEOUT_MS) for the
   * guest to release it.
   */
  remove(id: unknown, timeoutMs: unknown = UNPLUG_TIMEOUT_MS): Promise<void> {
    return this.#serial(() => this.#remove(id, timeoutMs));
  }

  async #add(input: unknown): Promise<Device> {
    let device: Device;
    try {
      device = validateTopology({ devices: [input] }).devices[0];
    } catch (e) {
      throw new HotplugError(`add: ${(e as Error).message.replace(/^devices\[0\]/, "device")}`);
    }
    if (this.#ids.has(device.id)) throw new HotplugError(`add: a device ${JSON.stringify(device.id)} exists`);
    const qmp = this.#ctx.vm.qmp;
    if (!qmp) throw new HotplugError("add: QEMU's QMP is not connected");
    const p: Plugged = { device, resources: [], viaServe: false, chardev: false };
    const dir = this.#ctx.vm.plan.runtimeDir;
    const step = async <T>(what: string, fn: () => Promise<T>): Promise<T> => {
      try {
        return await fn();
      } catch (e) {
        await this.#undo(p, qmp);
        throw new HotplugError(`add ${device.id}: ${what} failed: ${(e as Error).message}; nothing was left`);
      }
    };
    if (device.type === "vhost-user" || (device.type === "vhost-user-blk" && "qsd" in device.backend)) {
      throw new HotplugError(
        `add ${device.id}: only mpq-served or external vhost-user-blk/rng, remote and ivshmem devices can be ` +
          `hot-plugged (not ${
            device.type === "vhost-user" ? device.device : "a qemu-storage-daemon back-end"
          })`,
      );
    }
    switch (device.type) {
      case "vhost-user-blk":
      case "vhost-user-rng": {
        let path: string;
        if ("socket" in device.backend) {
          path = device.backend.socket;
          if (!isListening(path)) {
            throw new HotplugError(`add ${device.id}: nothing is listening on ${path}`);
          }
        } else {
          path = `${dir}/vhost-${device.id}.sock`;
          const spec = device.type === "vhost-user-blk"
            ? {
              type: "blk",
              id: device.id,
              socket: path,
              file: (device.backend as { mpq: { file: string } }).mpq.file,
              readOnly: (device.backend as { mpq: { readOnly: boolean } }).mpq.readOnly,
              numQueues: (device.backend as { mpq: { numQueues?: number } }).mpq.numQueues ??
                device.numQueues ?? 1,
            }
            : { type: "rng", id: device.id, socket: path };
          const ctl = await step("starting the vhost back-end", () => this.#serveControl());
          await step("the vhost back-end", async () => {
            const r = await controlRequest(ctl, "add", { device: spec });
            if (!r.ok) throw new Error(r.error);
            p.viaServe = true;
          });
        }
        await step(
          "handing QEMU the socket (getfd)",
          () => this.#giveConnected(qmp, path, `fd-${device.id}`),
        );
        await step("chardev-add", async () => {
          await qmp.execute("chardev-add", {
            id: `chr-${device.id}`,
            backend: {
              type: "socket",
              data: { addr: { type: "fd", data: { str: `fd-${device.id}` } }, server: false },
            },
          });
          p.chardev = true;
        });
        const args: Record<string, unknown> = device.type === "vhost-user-blk"
          ? {
            driver: "vhost-user-blk-pci",
            id: device.id,
            chardev: `chr-${device.id}`,
            "num-queues": device.numQueues ?? 1,
          }
          : { driver: "vhost-user-rng-pci", id: device.id, chardev: `chr-${device.id}` };
        await step("device_add", () => qmp.execute("device_add", args));
        break;
      }
      case "remote": {
        const pair = `remote-${device.id}`;
        p.resources.push({ id: pair, kind: "socketpair", purpose: `proxy <-> remote ${device.id}` });
        const planned = remoteProcess(device, this.#ctx.qemu, pair);
        p.child = await step(
          "starting the remote process",
          () => this.#ctx.vm.addProcess(planned, p.resources),
        );
        await step("handing QEMU the socketpair (getfd)", async () => {
          const end = this.#ctx.vm.pairEnd(pair, 0);
          if (!end) throw new Error("the socketpair is gone");
          await qmp.execute("getfd", { fdname: `fd-${device.id}` }, { fds: [end.dup()] });
        });
        await step(
          "device_add",
          () =>
            qmp.execute("device_add", { driver: "x-pci-proxy-dev", id: device.id, fd: `fd-${device.id}` }),
        );
        this.#ctx.vm.dropResources(p.resources.filter((r) => r.kind === "socketpair")); // both ends given away
        break;
      }
      case "ivshmem": {
        let path: string;
        if ("socket" in device.server) {
          path = device.server.socket;
        } else {
          path = `${dir}/ivshmem-${device.id}.sock`;
          const planned = ivshmemProcess(
            device.id,
            device.server.mpq.size,
            device.vectors,
            path,
            this.#ctx.self,
          );
          p.child = await step("starting the ivshmem server", () => this.#ctx.vm.addProcess(planned, []));
        }
        await step("chardev-add", async () => {
          await qmp.execute("chardev-add", {
            id: `chr-${device.id}`,
            backend: { type: "socket", data: { addr: { type: "unix", data: { path } }, server: false } },
          });
          p.chardev = true;
        });
        await step("device_add", () =>
          qmp.execute("device_add", {
            driver: "ivshmem-doorbell",
            id: device.id,
            chardev: `chr-${device.id}`,
            vectors: device.vectors,
          }));
        break;
      }
    }
    this.#ids.add(device.id);
    this.#plugged.set(device.id, p);
    this.#ctx.log(`added ${device.type} ${device.id}`);
    this.#ctx.changed?.("added", device.id);
    return device;
  }

  /** Undoes what a failed add did, in reverse (never throws). */
  async #undo(p: Plugged, qmp: QmpClient): Promise<void> {
    const id = p.device.id;
    await qmp.execute("closefd", { fdname: `fd-${id}` }).catch(() => {});
    if (p.chardev) await qmp.execute("chardev-remove", { id: `chr-${id}` }).catch(() => {});
    p.chardev = false;
    if (p.viaServe) await this.#serveRemove(id).catch(() => {});
    p.viaServe = false;
    if (p.child) await this.#ctx.vm.removeProcess(p.child);
    p.child = undefined;
    this.#ctx.vm.dropResources(p.resources);
  }

  async #remove(idArg: unknown, timeoutArg: unknown): Promise<void> {
    if (typeof idArg !== "string") throw new HotplugError(`remove needs "id": got ${JSON.stringify(idArg)}`);
    const timeoutMs = timeoutArg ?? UNPLUG_TIMEOUT_MS;
    if (!Number.isSafeInteger(timeoutMs) || (timeoutMs as number) < 1 || (timeoutMs as number) > 600_000) {
      throw new HotplugError(`remove: timeoutMs must be 1..600000: got ${JSON.stringify(timeoutArg)}`);
    }
    const id = idArg;
    const p = this.#plugged.get(id);
    if (!this.#ids.has(id)) {
      throw new HotplugError(
        `remove: no device ${JSON.stringify(id)} (devices: ${[...this.#ids].join(", ") || "none"})`,
      );
    }
    if (!p) {
      throw new HotplugError(
        `remove ${id}: only devices added with \`add\` can be removed (the topology's stay until the VM stops)`,
      );
    }
    const qmp = this.#ctx.vm.qmp;
    if (!qmp) throw new HotplugError("remove: QEMU's QMP is not connected");
    let gone!: () => void;
    const deleted = new Promise<void>((r) => gone = r);
    const off = qmp.onEvent((e) => {
      if (e.event === "DEVICE_DELETED" && (e.data as { device?: string } | undefined)?.device === id) gone();
    });
    try {
      await qmp.execute("device_del", { id });
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = await Promise.race([
        deleted.then(() => false),
        new Promise<boolean>((r) => timer = setTimeout(() => r(true), timeoutMs as number)),
      ]);
      clearTimeout(timer);
      if (late) {
        throw new HotplugError(
          `remove ${id}: the guest did not release it within ${
            (timeoutMs as number) / 1000
          } s (device_del sent: ` +
            `QEMU removes it when the guest acknowledges; its back-end keeps serving until then — remove again to retry)`,
        );
      }
    } finally {
      off();
    }
    await this.#undo(p, qmp);
    this.#plugged.delete(id);
    this.#ids.delete(id);
    this.#ctx.log(`removed ${p.device.type} ${id}`);
    this.#ctx.changed?.("removed", id);
  }

  /** Connects to a back-end socket and gives QEMU the connected fd under `name`. */
  async #giveConnected(qmp: QmpClient, path: string, name: string): Promise<void> {
    const sock = connectUnix(path, { nonBlocking: false });
    try {
      await qmp.execute("getfd", { fdname: name }, { fds: [sock.fd.dup()] });
    } finally {
      sock.close();
    }
  }

  /** The VM's `mpq vhost serve` control socket; starts a serve when the VM has none. */
  async #serveControl(): Promise<string> {
    const path = `${this.#ctx.vm.plan.runtimeDir}/vhost.ctl`;
    const planned = this.#ctx.vm.children.find((c) => c.planned.role === "vhost" && !c.process.status);
    if (planned && isListening(path)) return path;
    if (this.#serve && !this.#serve.process.status) return path;
    this.#serve = await this.#ctx.vm.addProcess({
      name: "vhost (hot-plug)",
      role: "vhost",
      argv: [...this.#ctx.self, "vhost", "serve", "--control", path],
      env: {},
      fds: [],
      ready: { kind: "listening", path },
      ownProcessGroup: true,
    }, []);
    return path;
  }

  async #serveRemove(id: string): Promise<void> {
    const path = `${this.#ctx.vm.plan.runtimeDir}/vhost.ctl`;
    const r = await controlRequest(path, "remove", { id, force: true });
    if (!r.ok) throw new Error(r.error);
  }
}
