/**
 * The topology of one VM (JSON): schema and validation. Every error names the field path, what was
 * there and what was expected ("devices[1].socket: expected a string path, got 42").
 * @module
 */

/** How QEMU starts: `run` right away, `paused` (-S), `preconfig` (--preconfig), or both. */
export type StartMode = "run" | "paused" | "preconfig" | "preconfig-paused";

/** One QMP command run by the orchestrator. */
export interface QmpStep {
  execute: string;
  arguments?: Record<string, unknown>;
  /** When set, the step fails unless every key here equals the same key of the result (deep). */
  expect?: Record<string, unknown>;
}

/** A disk image (main QEMU `-drive`, or a drive of a remote SCSI controller). */
export interface Drive {
  file: string;
  format: "raw" | "qcow2";
  readOnly: boolean;
}

/** A device emulated in its own `-machine x-remote` QEMU process, reached through x-pci-proxy-dev. */
export interface RemoteDevice {
  type: "remote";
  id: string;
  /** The PCI device model in the remote process, e.g. "lsi53c895a". */
  device: string;
  /** Drives attached as scsi-hd on bus `<id>.0` (for SCSI controllers). */
  drives: Drive[];
  /** QEMU binary of the remote process (default: the VM's). */
  qemu?: string;
  extraArgs: string[];
}

/** Who serves a vhost-user or ivshmem socket: an mpq child of the orchestrator, or someone else. */
export type Backend<M> = { mpq: M } | { socket: string };

/**
 * qemu-storage-daemon as a disk's back-end, for what mpq vhost does not do (qcow2 images and their
 * backing chains): mpq starts it with a vhost-user-blk export on a socket mpq pre-opens.
 */
export interface QsdBackend {
  qsd: { file: string; format: "raw" | "qcow2"; readOnly: boolean; binary: string };
}

/** A vhost-user block device. */
export interface VhostBlkDevice {
  type: "vhost-user-blk";
  id: string;
  backend: Backend<{ file: string; readOnly: boolean; numQueues?: number }> | QsdBackend;
  numQueues?: number;
  /**
   * When its mpq back-end fails: "on-failure" restarts it (QEMU reconnects, requests in flight are
   * resubmitted) up to RESTART_LIMIT times in RESTART_WINDOW_MS; "never" (default) tears the VM down.
   */
  restart: "on-failure" | "never";
}

/** Restarts of a back-end allowed within RESTART_WINDOW_MS before the VM is torn down. */
export const RESTART_LIMIT = 3;
/** The window RESTART_LIMIT counts in. */
export const RESTART_WINDOW_MS = 60_000;

/** A vhost-user entropy device. */
export interface VhostRngDevice {
  type: "vhost-user-rng";
  id: string;
  backend: Backend<Record<string, never>>;
}

/** An ivshmem-doorbell device and its server. */
export interface IvshmemDevice {
  type: "ivshmem";
  id: string;
  vectors: number;
  server: Backend<{ size: string }>;
}

/**
 * Any vhost-user device QEMU has (vhost-user-fs-pci, vhost-user-gpu-pci, ...) with any back-end:
 * one named by a QEMU vhost-user JSON descriptor (docs/interop/vhost-user.json), a command line, or a
 * socket someone else serves. mpq starts the first two with `--fd=3` on a socket it pre-opens.
 */
export interface GenericVhostDevice {
  type: "vhost-user";
  id: string;
  /** The QEMU device model, e.g. "vhost-user-fs-pci". */
  device: string;
  backend: { descriptor: string; args: string[] } | { command: string[] } | { socket: string };
  /** More `-device` properties (`tag` for vhost-user-fs-pci, ...). */
  properties: Record<string, string | number | boolean>;
}

/** Any device of a topology. */
export type Device = RemoteDevice | VhostBlkDevice | VhostRngDevice | IvshmemDevice | GenericVhostDevice;

/** Where the guest's serial console goes. */
export type Console = "none" | "stdio" | { file: string };

/** A validated topology: every default filled in. */
export interface Topology {
  name: string;
  qemu: string;
  machine: string;
  accel: string;
  cpus: number;
  /** Guest RAM in bytes (a whole number of MiB). */
  memory: number;
  kernel?: string;
  initrd?: string;
  append?: string;
  disks: Drive[];
  console: Console;
  /** SeaBIOS debug console (port 0x402) to this file. */
  debugcon?: string;
  start: StartMode;
  /** QMP steps before the guest starts (need a `paused` or `preconfig` start). */
  steps: QmpStep[];
  /** QMP steps after the guest has started. */
  afterStart: QmpStep[];
  /** A second QMP monitor for operators (`mpq qmp PATH ...`), listening at this path. */
  qmpSocket?: string;
  /** The control socket (`mpq ctl PATH ...`; default: control.sock in the runtime directory). */
  control?: string;
  extraArgs: string[];
  devices: Device[];
}

/** A topology that failed validation; `message` starts with the field path. */
export class TopologyError extends Error {
  /** Path of the offending field, e.g. "devices[1].socket". */
  readonly path: string;
  constructor(path: string, message: string) {
    super(`${path}: ${message}`);
    this.name = "TopologyError";
    this.path = path;
  }
}

type Obj = Record<string, unknown>;

function describe(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "object") return "an object";
  if (typeof v === "string") return JSON.stringify(v);
  return String(v);
}

function at(path: string, key: string | number): string {
  if (typeof key === "number") return `${path}[${key}]`;
  return path ? `${path}.${key}` : key;
}

function obj(v: unknown, path: string, allowed: readonly string[]): Obj {
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new TopologyError(path || "(top level)", `expected an object, got ${describe(v)}`);
  }
  for (const k of Object.keys(v)) {
    if (!allowed.includes(k)) {
      throw new TopologyError(at(path, k), `unknown field (expected one of: ${allowed.join(", ")})`);
    }
  }
  return v as Obj;
}

function str(o: Obj, key: string, path: string, what = "a string"): string | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== "string" || v === "") {
    throw new TopologyError(at(path, key), `expected ${what}, got ${describe(v)}`);
  }
  return v;
}

function reqStr(o: Obj, key: string, path: string, what = "a string"): string {
  const v = str(o, key, path, what);
  if (v === undefined) throw new TopologyError(at(path, key), `missing (expected ${what})`);
  return v;
}

function bool(o: Obj, key: string, path: string): boolean | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== "boolean") {
    throw new TopologyError(at(path, key), `expected true or false, got ${describe(v)}`);
  }
  return v;
}

function int(o: Obj, key: string, path: string, min: number, max: number): number | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
    throw new TopologyError(at(path, key), `expected an integer ${min}..${max}, got ${describe(v)}`);
  }
  return v;
}

function strArray(o: Obj, key: string, path: string): string[] {
  const v = o[key];
  if (v === undefined) return [];
  if (!Array.isArray(v)) {
    throw new TopologyError(at(path, key), `expected an array of strings, got ${describe(v)}`);
  }
  return v.map((s, i) => {
    if (typeof s !== "string") {
      throw new TopologyError(at(at(path, key), i), `expected a string, got ${describe(s)}`);
    }
    return s;
  });
}

function oneOf<T extends string>(o: Obj, key: string, path: string, values: readonly T[]): T | undefined {
  const v = o[key];
  if (v === undefined) return undefined;
  if (typeof v !== "string" || !values.includes(v as T)) {
    throw new TopologyError(
      at(path, key),
      `expected one of ${values.map((x) => `"${x}"`).join(", ")}, got ${describe(v)}`,
    );
  }
  return v as T;
}

const SIZE_UNITS: Record<string, number> = { "": 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/**
 * Parses a byte size: an integer (bytes) or a string with an optional K/M/G/T suffix (powers of 1024).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(parseSize("512M", "memory"), 536870912);
 * assert.throws(() => parseSize("lots", "memory"), {
 *   name: "TopologyError",
 *   message: 'memory: expected a size such as "512M" or a byte count, got "lots"',
 * });
 * ```
 */
export function parseSize(v: unknown, path: string): number {
  if (typeof v === "number" && Number.isSafeInteger(v) && v > 0) return v;
  if (typeof v === "string") {
    const m = /^(\d+)\s*([KMGT]?)(i?B)?$/i.exec(v.trim());
    if (m) {
      const n = Number(m[1]) * SIZE_UNITS[m[2].toUpperCase()];
      if (Number.isSafeInteger(n) && n > 0) return n;
    }
  }
  throw new TopologyError(path, `expected a size such as "512M" or a byte count, got ${describe(v)}`);
}

const ID_RE = /^[A-Za-z][A-Za-z0-9_-]{0,31}$/;

function id(o: Obj, path: string, seen: Map<string, string>): string {
  const v = reqStr(o, "id", path, "an id (letter, then letters, digits, '-' or '_', at most 32)");
  if (!ID_RE.test(v)) {
    throw new TopologyError(
      at(path, "id"),
      `expected an id (letter, then letters, digits, '-' or '_', at most 32), got ${describe(v)}`,
    );
  }
  const reserved = ["mem", "mon", "mon-op", "con0"];
  if (reserved.includes(v)) {
    throw new TopologyError(at(path, "id"), `"${v}" is reserved by mpq (${reserved.join(", ")})`);
  }
  const prev = seen.get(v);
  if (prev) throw new TopologyError(at(path, "id"), `"${v}" is already the id of ${prev}`);
  seen.set(v, path);
  return v;
}

function drive(v: unknown, path: string): Drive {
  const o = obj(v, path, ["file", "format", "readOnly"]);
  return {
    file: reqStr(o, "file", path, "a string path"),
    format: oneOf(o, "format", path, ["raw", "qcow2"] as const) ?? "raw",
    readOnly: bool(o, "readOnly", path) ?? false,
  };
}

function drives(o: Obj, key: string, path: string): Drive[] {
  const v = o[key];
  if (v === undefined) return [];
  if (!Array.isArray(v)) {
    throw new TopologyError(at(path, key), `expected an array of drives, got ${describe(v)}`);
  }
  return v.map((d, i) => drive(d, at(at(path, key), i)));
}

function steps(o: Obj, key: string, path: string): QmpStep[] {
  const v = o[key];
  if (v === undefined) return [];
  if (!Array.isArray(v)) {
    throw new TopologyError(at(path, key), `expected an array of QMP steps, got ${describe(v)}`);
  }
  return v.map((s, i) => {
    const p = at(at(path, key), i);
    const so = obj(s, p, ["execute", "arguments", "expect"]);
    const step: QmpStep = { execute: reqStr(so, "execute", p, "a QMP command name") };
    for (const k of ["arguments", "expect"] as const) {
      if (so[k] === undefined) continue;
      const a = so[k];
      if (typeof a !== "object" || a === null || Array.isArray(a)) {
        throw new TopologyError(at(p, k), `expected an object, got ${describe(a)}`);
      }
      step[k] = a as Record<string, unknown>;
    }
    return step;
  });
}

function backend<M>(
  o: Obj,
  key: string,
  path: string,
  mpq: (v: unknown, path: string) => M,
): Backend<M> {
  const p = at(path, key);
  if (o[key] === undefined) {
    throw new TopologyError(p, `missing (expected {"mpq": {...}} or {"socket": "PATH"})`);
  }
  const b = obj(o[key], p, ["mpq", "socket"]);
  if ((b.mpq === undefined) === (b.socket === undefined)) {
    throw new TopologyError(
      p,
      `expected exactly one of "mpq" (an mpq child serves it) or "socket" (an external server)`,
    );
  }
  if (b.socket !== undefined) return { socket: reqStr(b, "socket", p, "a string path") };
  return { mpq: mpq(b.mpq, at(p, "mpq")) };
}

function qsdBackend(o: Obj, path: string): QsdBackend {
  const bp = at(path, "backend");
  const b = obj(o.backend, bp, ["qsd"]);
  const p = at(bp, "qsd");
  const q = obj(b.qsd, p, ["file", "format", "readOnly", "binary"]);
  return {
    qsd: {
      file: reqStr(q, "file", p, "a string path"),
      format: oneOf(q, "format", p, ["raw", "qcow2"] as const) ?? "raw",
      readOnly: bool(q, "readOnly", p) ?? false,
      binary: str(q, "binary", p, "a program") ?? "qemu-storage-daemon",
    },
  };
}

function device(v: unknown, path: string, seen: Map<string, string>): Device {
  const kinds = ["remote", "vhost-user-blk", "vhost-user-rng", "ivshmem", "vhost-user"] as const;
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new TopologyError(path, `expected an object, got ${describe(v)}`);
  }
  const type = oneOf(v as Obj, "type", path, kinds);
  if (type === undefined) {
    throw new TopologyError(
      at(path, "type"),
      `missing (expected one of ${kinds.map((k) => `"${k}"`).join(", ")})`,
    );
  }
  switch (type) {
    case "remote": {
      const o = obj(v, path, ["type", "id", "device", "drives", "qemu", "extraArgs"]);
      return {
        type,
        id: id(o, path, seen),
        device: reqStr(o, "device", path, 'a QEMU PCI device model such as "lsi53c895a"'),
        drives: drives(o, "drives", path),
        qemu: str(o, "qemu", path, "a QEMU binary"),
        extraArgs: strArray(o, "extraArgs", path),
      };
    }
    case "vhost-user-blk": {
      const o = obj(v, path, ["type", "id", "backend", "numQueues", "restart"]);
      const devId = id(o, path, seen);
      const restart = oneOf(o, "restart", path, ["on-failure", "never"] as const) ?? "never";
      const b = o.backend;
      const isQsd = typeof b === "object" && b !== null && !Array.isArray(b) && "qsd" in b;
      if (restart === "on-failure" && typeof b === "object" && b !== null && ("socket" in b || isQsd)) {
        throw new TopologyError(
          at(path, "restart"),
          `"on-failure" needs an mpq back-end ("backend": {"mpq": ...}): mpq restarts only its own vhost back-end`,
        );
      }
      return {
        type,
        id: devId,
        restart,
        backend: isQsd ? qsdBackend(o, path) : backend(o, "backend", path, (m, p) => {
          const mo = obj(m, p, ["file", "readOnly", "numQueues"]);
          const out: { file: string; readOnly: boolean; numQueues?: number } = {
            file: reqStr(mo, "file", p, "a string path"),
            readOnly: bool(mo, "readOnly", p) ?? false,
          };
          const nq = int(mo, "numQueues", p, 1, 64);
          if (nq !== undefined) out.numQueues = nq;
          return out;
        }),
        numQueues: int(o, "numQueues", path, 1, 64),
      };
    }
    case "vhost-user-rng": {
      if (typeof v === "object" && v !== null && "restart" in v) {
        throw new TopologyError(
          at(path, "restart"),
          "only vhost-user-blk back-ends can be restarted (QEMU 7.2 reconnects vhost-user-blk, not vhost-user-rng)",
        );
      }
      const o = obj(v, path, ["type", "id", "backend"]);
      return {
        type,
        id: id(o, path, seen),
        backend: backend(o, "backend", path, (m, p) => {
          obj(m, p, []);
          return {} as Record<string, never>;
        }),
      };
    }
    case "vhost-user": {
      const o = obj(v, path, ["type", "id", "device", "backend", "properties"]);
      const devId = id(o, path, seen);
      const model = reqStr(o, "device", path, 'a QEMU vhost-user device model such as "vhost-user-fs-pci"');
      if (!/^vhost-user-[a-z0-9-]+$/.test(model)) {
        throw new TopologyError(
          at(path, "device"),
          `expected a vhost-user-* device model, got ${describe(model)}`,
        );
      }
      const bp = at(path, "backend");
      if (o.backend === undefined) {
        throw new TopologyError(
          bp,
          `missing (expected {"descriptor": NAME}, {"command": [...]} or {"socket": PATH})`,
        );
      }
      const b = obj(o.backend, bp, ["descriptor", "args", "command", "socket"]);
      const given = ["descriptor", "command", "socket"].filter((k) => b[k] !== undefined);
      if (given.length !== 1) {
        throw new TopologyError(
          bp,
          `expected exactly one of "descriptor", "command" or "socket", got ${given.length}`,
        );
      }
      let be: GenericVhostDevice["backend"];
      if (b.descriptor !== undefined) {
        be = {
          descriptor: reqStr(b, "descriptor", bp, "a descriptor name or type"),
          args: strArray(b, "args", bp),
        };
      } else if (b.command !== undefined) {
        if (b.args !== undefined) {
          throw new TopologyError(at(bp, "args"), `goes with "descriptor" (put them in "command")`);
        }
        const command = strArray(b, "command", bp);
        if (command.length === 0) {
          throw new TopologyError(at(bp, "command"), "expected a program and its arguments");
        }
        be = { command };
      } else {
        if (b.args !== undefined) throw new TopologyError(at(bp, "args"), `goes with "descriptor"`);
        be = { socket: reqStr(b, "socket", bp, "a string path") };
      }
      const props: Record<string, string | number | boolean> = {};
      if (o.properties !== undefined) {
        const po = obj(o.properties, at(path, "properties"), Object.keys(o.properties as Obj));
        for (const [k, val] of Object.entries(po)) {
          if (!/^[a-z][a-z0-9-]*$/.test(k) || ["id", "chardev", "driver"].includes(k)) {
            throw new TopologyError(at(at(path, "properties"), k), `not a property mpq lets you set`);
          }
          if (!["string", "number", "boolean"].includes(typeof val)) {
            throw new TopologyError(
              at(at(path, "properties"), k),
              `expected a string, number or boolean, got ${describe(val)}`,
            );
          }
          props[k] = val as string | number | boolean;
        }
      }
      return { type, id: devId, device: model, backend: be, properties: props };
    }
    case "ivshmem": {
      const o = obj(v, path, ["type", "id", "vectors", "server"]);
      return {
        type,
        id: id(o, path, seen),
        vectors: int(o, "vectors", path, 1, 64) ?? 1,
        server: backend(o, "server", path, (m, p) => {
          const mo = obj(m, p, ["size"]);
          const size = mo.size ?? "4M";
          parseSize(size, at(p, "size"));
          return { size: String(size) };
        }),
      };
    }
  }
}

const TOP_FIELDS = [
  "name",
  "qemu",
  "machine",
  "accel",
  "cpus",
  "memory",
  "kernel",
  "initrd",
  "append",
  "disks",
  "console",
  "debugcon",
  "start",
  "steps",
  "afterStart",
  "qmpSocket",
  "control",
  "extraArgs",
  "devices",
] as const;

/**
 * Validates parsed JSON as a topology and fills in defaults. Throws TopologyError naming the field.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const devices = [{ type: "remote", id: "lsi0", device: "lsi53c895a" }];
 * const t = validateTopology({ memory: "512M", devices });
 * assert.equal(t.memory, 512 * 2 ** 20);
 * assert.equal(t.qemu, "qemu-system-x86_64"); // defaults filled in
 * assert.throws(() => validateTopology({ cpus: 0 }), { message: "cpus: expected an integer 1..255, got 0" });
 * ```
 */
export function validateTopology(input: unknown): Topology {
  const o = obj(input, "", TOP_FIELDS);
  const name = str(o, "name", "", "a name") ?? "vm";
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(name)) {
    throw new TopologyError(
      "name",
      `expected letters, digits, '.', '-' or '_' (at most 64), got ${describe(name)}`,
    );
  }
  const memory = o.memory === undefined ? 512 * 1024 ** 2 : parseSize(o.memory, "memory");
  if (memory % 1024 ** 2 !== 0 || memory < 16 * 1024 ** 2) {
    throw new TopologyError(
      "memory",
      `expected a whole number of MiB, at least 16M, got ${describe(o.memory)}`,
    );
  }
  const t: Topology = {
    name,
    qemu: str(o, "qemu", "", "a QEMU binary") ?? "qemu-system-x86_64",
    machine: str(o, "machine", "", 'a machine type such as "pc" or "q35"') ?? "pc",
    accel: str(o, "accel", "", 'an accelerator such as "tcg" or "kvm"') ?? "tcg",
    cpus: int(o, "cpus", "", 1, 255) ?? 1,
    memory,
    disks: drives(o, "disks", ""),
    console: "stdio",
    start: oneOf(o, "start", "", ["run", "paused", "preconfig", "preconfig-paused"] as const) ?? "run",
    steps: steps(o, "steps", ""),
    afterStart: steps(o, "afterStart", ""),
    extraArgs: strArray(o, "extraArgs", ""),
    devices: [],
  };
  for (const k of ["kernel", "initrd", "append", "debugcon", "qmpSocket", "control"] as const) {
    const v = str(o, k, "", k === "append" ? "a kernel command line" : "a string path");
    if (v !== undefined) t[k] = v;
  }
  if ((t.initrd !== undefined || t.append !== undefined) && t.kernel === undefined) {
    throw new TopologyError(t.initrd !== undefined ? "initrd" : "append", `needs "kernel" to be set`);
  }
  if (o.console !== undefined) {
    const c = o.console;
    if (c === "none" || c === "stdio") t.console = c;
    else if (typeof c === "object" && c !== null && !Array.isArray(c)) {
      const co = obj(c, "console", ["file"]);
      t.console = { file: reqStr(co, "file", "console", "a string path") };
    } else {
      throw new TopologyError("console", `expected "none", "stdio" or {"file": "PATH"}, got ${describe(c)}`);
    }
  }
  if (t.steps.length > 0 && t.start === "run") {
    throw new TopologyError(
      "steps",
      `need "start" to be "paused", "preconfig" or "preconfig-paused" (got "run": the guest would already be running)`,
    );
  }
  if (o.devices !== undefined && !Array.isArray(o.devices)) {
    throw new TopologyError("devices", `expected an array of devices, got ${describe(o.devices)}`);
  }
  const seen = new Map<string, string>();
  t.devices = ((o.devices as unknown[] | undefined) ?? []).map((d, i) => device(d, `devices[${i}]`, seen));
  return t;
}

/**
 * Parses JSON text and validates it. A syntax error is reported as a TopologyError of `(json)`.
 */
export function parseTopology(text: string, source = "topology"): Topology {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new TopologyError("(json)", `${source} is not valid JSON: ${(e as Error).message}`);
  }
  return validateTopology(json);
}
