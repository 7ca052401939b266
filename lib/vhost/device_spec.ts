/**
 * What `mpq vhost` serves, as data: one {@link DeviceSpec} per device, parsed from a
 * `--device blk,file=disk.img,socket=/run/d0.sock` argument, from a JSON object (a config file or a
 * control-socket `add` request), or from the single-device flags. Pure: nothing here opens a file.
 * Every error names the field, the value and what was expected.
 * @module
 */
import { type EngineChoice, parseEngineChoice } from "./devices/blk_engine.ts";

/** Where a device listens: a path it creates, or an inherited listening socket. */
export type Listen = { socket: string } | { fd: number };

/** A virtio-blk device on a raw file or block device. */
export interface BlkSpec {
  type: "blk";
  id: string;
  listen: Listen;
  file: string;
  readOnly: boolean;
  serial: string;
  blkSize: 512 | 4096;
  numQueues: number;
  direct: boolean;
  writeback: boolean;
  engine: EngineChoice;
  ioThreads: 0 | 1;
}

/** A virtio-rng device. */
export interface RngSpec {
  type: "rng";
  id: string;
  listen: Listen;
}

/** One device `mpq vhost` serves. */
export type DeviceSpec = BlkSpec | RngSpec;

/** A spec that does not make sense; the message names the field, the value and what was expected. */
export class SpecError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "SpecError";
  }
}

/** Most queues a blk device offers. */
export const MAX_QUEUES = 64;

/**
 * Queues of a blk device given without num-queues: QEMU's vhost-user-blk-pci asks for one queue
 * per vCPU, so offer as many as the host has CPUs (at most MAX_QUEUES).
 */
export function hostQueueCount(): number {
  return Math.min(MAX_QUEUES, Math.max(1, navigator.hardwareConcurrency || 1));
}
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/** The keys each device type takes (in `--device` and JSON), with their kinds. */
const KEYS = {
  blk: {
    id: "string",
    socket: "string",
    fd: "int",
    file: "string",
    "read-only": "bool",
    serial: "string",
    "blk-size": "int",
    "num-queues": "int",
    direct: "bool",
    writeback: "bool",
    engine: "string",
    "io-threads": "int",
  },
  rng: { id: "string", socket: "string", fd: "int" },
} as const;

type Raw = Record<string, string | number | boolean>;

/** JSON spellings of the keys (camelCase, as in topology files) mapped to the flag spellings. */
const JSON_NAMES: Record<string, string> = {
  readOnly: "read-only",
  blkSize: "blk-size",
  numQueues: "num-queues",
  ioThreads: "io-threads",
};

/**
 * Parses `blk,file=disk.img,socket=/run/d0.sock,read-only` (QEMU's -device style: the type first,
 * then key=value pairs; a boolean key alone means true; a comma inside a value is written twice).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(parseDeviceArg("rng,socket=/run/rng0.sock", { defaultQueues: 2, index: 0 }), {
 *   type: "rng",
 *   id: "rng0",
 *   listen: { socket: "/run/rng0.sock" },
 * });
 * ```
 */
export function parseDeviceArg(arg: string, options: SpecDefaults): DeviceSpec {
  const [type, ...pairs] = splitOpts(arg);
  const raw: Raw = {};
  for (const p of pairs) {
    if (p === "") throw new SpecError(`empty item in ${JSON.stringify(arg)}`);
    const eq = p.indexOf("=");
    const key = eq < 0 ? p : p.slice(0, eq);
    if (key in raw) throw new SpecError(`${key} given twice`);
    raw[key] = eq < 0 ? true : p.slice(eq + 1);
  }
  return build(type, raw, options, "text");
}

/** Splits at single commas; `,,` is a comma inside a value (QEMU's option escaping). */
function splitOpts(arg: string): string[] {
  const out: string[] = [];
  let cur = "";
  for (let i = 0; i < arg.length; i++) {
    if (arg[i] !== ",") {
      cur += arg[i];
    } else if (arg[i + 1] === ",") {
      cur += ",";
      i++;
    } else {
      out.push(cur);
      cur = "";
    }
  }
  out.push(cur);
  return out;
}

/**
 * Checks a device given as JSON (`{"type": "blk", "file": "...", "socket": "..."}`; keys in flag
 * spelling or camelCase).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const spec = deviceSpecFromJson(
 *   { type: "blk", file: "/d.img", fd: 3, readOnly: true },
 *   { defaultQueues: 1, index: 0 },
 * );
 * assert.equal(formatDeviceArg(spec), "blk,id=blk0,fd=3,file=/d.img,num-queues=1,read-only");
 * ```
 */
export function deviceSpecFromJson(value: unknown, options: SpecDefaults): DeviceSpec {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new SpecError(`a device must be a JSON object: got ${describe(value)}`);
  }
  const raw: Raw = {};
  let type: unknown = undefined;
  for (const [k, v] of Object.entries(value)) {
    if (k === "type") {
      type = v;
      continue;
    }
    if (typeof v !== "string" && typeof v !== "number" && typeof v !== "boolean") {
      throw new SpecError(`${k}: expected a string, number or boolean: got ${describe(v)}`);
    }
    raw[JSON_NAMES[k] ?? k] = v;
  }
  if (typeof type !== "string") throw new SpecError(`type: expected "blk" or "rng": got ${describe(type)}`);
  return build(type, raw, options, "json");
}

/** Defaults that depend on the host or on the position of the device. */
export interface SpecDefaults {
  /** Queues of a blk device without num-queues (the CLI uses the host's CPU count). */
  defaultQueues: number;
  /** The device's position, for its default id (`blk0`, `rng1`). */
  index: number;
}

function describe(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "string") return JSON.stringify(v);
  if (typeof v === "object") return "an object";
  return `${typeof v} ${String(v)}`;
}

function build(type: string, raw: Raw, options: SpecDefaults, from: "text" | "json"): DeviceSpec {
  if (type !== "blk" && type !== "rng") {
    throw new SpecError(`device type must be blk or rng: got ${JSON.stringify(type)}`);
  }
  const keys: Record<string, string> = KEYS[type];
  for (const k of Object.keys(raw)) {
    if (!(k in keys)) {
      throw new SpecError(`${type} has no key ${JSON.stringify(k)} (keys: ${Object.keys(keys).join(", ")})`);
    }
  }
  const str = (k: string): string | undefined => {
    const v = raw[k];
    if (v === undefined) return undefined;
    if (typeof v !== "string" || v === "") {
      throw new SpecError(`${k}: expected a non-empty string: got ${describe(v)}`);
    }
    return v;
  };
  const int = (k: string, min: number, max: number): number | undefined => {
    const v = raw[k];
    if (v === undefined) return undefined;
    const n = typeof v === "number" ? v : typeof v === "string" && /^\d+$/.test(v) ? Number(v) : NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) {
      throw new SpecError(`${k} must be an integer in ${min}..${max}: got ${describe(v)}`);
    }
    return n;
  };
  const bool = (k: string): boolean => {
    const v = raw[k];
    if (v === undefined) return false;
    if (v === true || v === "on" || v === "true") return true;
    if (v === false || v === "off" || v === "false") return false;
    throw new SpecError(
      `${k} must be on or off${from === "json" ? " (true or false)" : ""}: got ${describe(v)}`,
    );
  };
  const id = str("id") ?? `${type}${options.index}`;
  if (!ID_RE.test(id)) {
    throw new SpecError(
      `id must be 1-64 letters, digits, '_', '.' or '-' (not first): got ${JSON.stringify(id)}`,
    );
  }
  const socket = str("socket");
  const fd = int("fd", 0, 1 << 20);
  if ((socket === undefined) === (fd === undefined)) {
    throw new SpecError(`${id}: exactly one of socket=PATH or fd=N is required`);
  }
  const listen: Listen = socket !== undefined ? { socket } : { fd: fd! };
  if (type === "rng") return { type, id, listen };
  const file = str("file");
  if (file === undefined) throw new SpecError(`${id}: file=PATH is required`);
  const blkSize = int("blk-size", 512, 4096) ?? 512;
  if (blkSize !== 512 && blkSize !== 4096) {
    throw new SpecError(`blk-size must be 512 or 4096: got ${blkSize}`);
  }
  const serial = str("serial") ?? "";
  if (new TextEncoder().encode(serial).byteLength > 20) {
    throw new SpecError(`serial must be at most 20 bytes: got ${JSON.stringify(serial)}`);
  }
  let engine: EngineChoice;
  try {
    engine = parseEngineChoice(str("engine") ?? "auto");
  } catch (e) {
    throw new SpecError((e as Error).message);
  }
  return {
    type,
    id,
    listen,
    file,
    readOnly: bool("read-only"),
    serial,
    blkSize,
    numQueues: int("num-queues", 1, MAX_QUEUES) ?? options.defaultQueues,
    direct: bool("direct"),
    writeback: bool("writeback"),
    engine,
    ioThreads: (int("io-threads", 0, 1) ?? 1) as 0 | 1,
  };
}

/**
 * Checks that devices served together do not clash: ids, socket paths and fds are unique.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const a = parseDeviceArg("rng,id=r0,socket=/run/r.sock", { defaultQueues: 1, index: 0 });
 * const b = parseDeviceArg("rng,id=r1,socket=/run/r.sock", { defaultQueues: 1, index: 1 });
 * assert.throws(() => checkUnique([a, b]), {
 *   name: "SpecError",
 *   message: "r1: socket /run/r.sock is already used by r0",
 * });
 * ```
 */
export function checkUnique(specs: readonly DeviceSpec[]): void {
  const seen = new Map<string, string>();
  for (const s of specs) {
    const keys = [`id ${s.id}`, "socket" in s.listen ? `socket ${s.listen.socket}` : `fd ${s.listen.fd}`];
    for (const k of keys) {
      const other = seen.get(k);
      if (other !== undefined) throw new SpecError(`${s.id}: ${k} is already used by ${other}`);
      seen.set(k, s.id);
    }
  }
}

/** The spec as the `--device` text that parses back to it (for plans, logs and `list`). */
export function formatDeviceArg(s: DeviceSpec): string {
  const esc = (v: string) => v.replaceAll(",", ",,");
  const parts: string[] = [s.type, `id=${s.id}`];
  parts.push("socket" in s.listen ? `socket=${esc(s.listen.socket)}` : `fd=${s.listen.fd}`);
  if (s.type === "blk") {
    parts.push(`file=${esc(s.file)}`, `num-queues=${s.numQueues}`);
    if (s.readOnly) parts.push("read-only");
    if (s.serial) parts.push(`serial=${esc(s.serial)}`);
    if (s.blkSize !== 512) parts.push(`blk-size=${s.blkSize}`);
    if (s.direct) parts.push("direct");
    if (s.writeback) parts.push("writeback");
    if (s.engine !== "auto") parts.push(`engine=${s.engine}`);
    if (s.ioThreads !== 1) parts.push(`io-threads=${s.ioThreads}`);
  }
  return parts.join(",");
}
