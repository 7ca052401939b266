/**
 * The ivshmem client-server protocol (QEMU docs/specs/ivshmem-spec.rst), pure: the 8-byte
 * message codec, peer id allocation, the join/leave message plans the server executes, the
 * client's decoder, and the size/vector rules shared by the CLI. No I/O here.
 *
 * Every message is one little-endian signed 64-bit number, optionally with one fd (SCM_RIGHTS).
 * On connect a peer receives: the protocol version (0), its id, -1 with the shared memory fd,
 * `vectors` × (id, eventfd) for every existing peer, then `vectors` × (own id, eventfd).
 * Afterwards: (id, eventfd) × vectors when a peer joins, (id) alone when a peer leaves.
 * @module
 */

/** The protocol version the server sends first. */
export const PROTOCOL_VERSION = 0;
/** The value that accompanies the shared memory fd. */
export const SHM_MESSAGE = -1;
/** Bytes per message. */
export const MESSAGE_SIZE = 8;
/** Largest peer id: the doorbell register has 16 bits for it. */
export const MAX_PEER_ID = 0xffff;
/** Most interrupt vectors per peer (contrib ivshmem-server's IVSHMEM_SERVER_MAX_VECTORS). */
export const MAX_VECTORS = 64;
/** contrib ivshmem-server's default shared memory size. */
export const DEFAULT_SHM_SIZE = 4 * 1024 * 1024;

/** A message that breaks the protocol (bad version, id out of range, missing fd...). */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

/**
 * Encodes one message value as 8 little-endian bytes into `out` (or a new buffer).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(encodeMessage(-1), new Uint8Array(8).fill(255));
 * assert.deepEqual(encodeMessage(258), new Uint8Array([2, 1, 0, 0, 0, 0, 0, 0]));
 * ```
 */
export function encodeMessage(
  value: number | bigint,
  out: Uint8Array<ArrayBuffer> = new Uint8Array(MESSAGE_SIZE),
): Uint8Array<ArrayBuffer> {
  if (out.byteLength < MESSAGE_SIZE) {
    throw new RangeError(`message buffer must hold ${MESSAGE_SIZE} bytes: got ${out.byteLength}`);
  }
  const v = BigInt(value);
  if (v < -(1n << 63n) || v >= 1n << 63n) throw new RangeError(`message value out of int64 range: ${v}`);
  new DataView(out.buffer, out.byteOffset, MESSAGE_SIZE).setBigInt64(0, v, true);
  return out;
}

/**
 * Decodes the 8-byte little-endian message at the start of `bytes`.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(decodeMessage(encodeMessage(7)), 7n);
 * assert.throws(() => decodeMessage(new Uint8Array(4)), ProtocolError);
 * ```
 */
export function decodeMessage(bytes: Uint8Array): bigint {
  if (bytes.byteLength < MESSAGE_SIZE) {
    throw new ProtocolError(`short message: ${bytes.byteLength} bytes, expected ${MESSAGE_SIZE}`);
  }
  return new DataView(bytes.buffer, bytes.byteOffset, MESSAGE_SIZE).getBigInt64(0, true);
}

/** Whether `v` is a valid peer id (0..65535). */
export function isPeerId(v: number | bigint): boolean {
  const n = typeof v === "bigint" ? v : BigInt(Number.isInteger(v) ? v : -1);
  return n >= 0n && n <= BigInt(MAX_PEER_ID);
}

/**
 * Hands out peer ids: the first is 0, then ids grow monotonically and are reused only after the
 * 16-bit space wraps (QEMU's device mishandles an id that comes back quickly); ids in use are skipped.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const ids = new PeerIdAllocator();
 * assert.equal(ids.allocate(), 0);
 * assert.equal(ids.allocate(), 1);
 * ids.release(0);
 * assert.equal(ids.allocate(), 2); // 0 comes back only after the 16-bit space wraps
 * ```
 */
export class PeerIdAllocator {
  #next = 0;
  readonly #inUse = new Set<number>();

  /** The next id, or throws RangeError when all 65536 are in use. */
  allocate(): number {
    if (this.#inUse.size > MAX_PEER_ID) {
      throw new RangeError(`no free peer id: all ${MAX_PEER_ID + 1} ids are in use`);
    }
    let id = this.#next;
    while (this.#inUse.has(id)) id = (id + 1) & MAX_PEER_ID;
    this.#inUse.add(id);
    this.#next = (id + 1) & MAX_PEER_ID;
    return id;
  }

  /** Returns an id to the pool (it comes back only after the counter wraps). */
  release(id: number): void {
    this.#inUse.delete(id);
  }

  /** How many ids are in use. */
  get size(): number {
    return this.#inUse.size;
  }
}

/** Which fd a planned message carries. */
export type FdRef =
  | { kind: "shm" }
  | { kind: "vector"; peer: number; vector: number };

/** One planned message: its value and, optionally, the fd that goes with it. */
export interface PlannedMessage {
  /** The peer that receives the message. */
  to: number;
  value: number;
  fd?: FdRef;
}

/**
 * The messages of a join, in send order: the new peer's version, id and shm; the existing peers
 * told of the new peer's eventfds; the new peer told of every existing peer's; then its own.
 * This is contrib ivshmem-server's order, which QEMU's device expects.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * // Peer 1 joins peer 0, one vector each: version, id, shm to 1; 1's vector to 0; 0's, then its own, to 1.
 * assert.deepEqual(joinPlan(1, [0], 1).map((m) => [m.to, m.value]), [
 *   [1, 0],
 *   [1, 1],
 *   [1, -1],
 *   [0, 1],
 *   [1, 0],
 *   [1, 1],
 * ]);
 * ```
 */
export function joinPlan(newId: number, existing: readonly number[], vectors: number): PlannedMessage[] {
  const plan: PlannedMessage[] = [
    { to: newId, value: PROTOCOL_VERSION },
    { to: newId, value: newId },
    { to: newId, value: SHM_MESSAGE, fd: { kind: "shm" } },
  ];
  for (const other of existing) {
    for (let v = 0; v < vectors; v++) {
      plan.push({ to: other, value: newId, fd: { kind: "vector", peer: newId, vector: v } });
    }
  }
  for (const other of existing) {
    for (let v = 0; v < vectors; v++) {
      plan.push({ to: newId, value: other, fd: { kind: "vector", peer: other, vector: v } });
    }
  }
  for (let v = 0; v < vectors; v++) {
    plan.push({ to: newId, value: newId, fd: { kind: "vector", peer: newId, vector: v } });
  }
  return plan;
}

/**
 * The messages of a leave: every remaining peer gets the id alone (no fd).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.deepEqual(leavePlan(3, [0, 1]), [{ to: 0, value: 3 }, { to: 1, value: 3 }]);
 * ```
 */
export function leavePlan(leftId: number, remaining: readonly number[]): PlannedMessage[] {
  return remaining.map((to) => ({ to, value: leftId }));
}

/** What the client decoder reports. The caller keeps the fds: each message's fd goes with its event. */
export type ClientEvent =
  /** The shared memory fd arrived (the fd of this message is the shm). */
  | { type: "shm" }
  /** An eventfd for `peer`'s vector `vector` (own id: for receiving; others: for notifying). */
  | { type: "vector"; peer: number; vector: number }
  /** The initial sequence is complete: own id, own vector count, the peers already there. */
  | { type: "joined"; id: number; vectors: number; peers: number[] }
  /** A peer joined after us; all of its vectors have arrived. */
  | { type: "peer-joined"; peer: number; vectors: number }
  /** A peer left. */
  | { type: "peer-left"; peer: number };

type Phase = "version" | "id" | "shm" | "initial" | "running";

/**
 * The client side of the protocol as a state machine. Feed each message with `push`; call
 * `flush` whenever the socket has no more data for now.
 *
 * The protocol never states the vector count, so the decoder learns it: existing peers' runs
 * give it during the initial sequence, and "joined" is reported once the own run has that many
 * vectors (or, for the first peer, when the run ends at a flush). After that a new peer is
 * announced as soon as all of its vectors arrived. Servers with 0 vectors are not supported.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const d = new ClientDecoder();
 * d.push(0n, false); // version
 * d.push(3n, false); // our id
 * d.push(-1n, true); // the shared memory fd
 * d.push(3n, true); // our one vector
 * assert.deepEqual(d.flush(), [{ type: "joined", id: 3, vectors: 1, peers: [] }]);
 * ```
 */
export class ClientDecoder {
  #phase: Phase = "version";
  #id = -1;
  #ownVectors = 0;
  readonly #peers = new Map<number, number>();
  /** A peer whose vectors are arriving and that has not been announced yet. */
  #pending: number | null = null;

  /** Own id, or -1 before it arrived. */
  get id(): number {
    return this.#id;
  }

  /** How many own vectors arrived. */
  get vectors(): number {
    return this.#ownVectors;
  }

  /** Known peers (not us) and how many vectors each has. */
  get peers(): ReadonlyMap<number, number> {
    return this.#peers;
  }

  /** Whether "joined" has been reported. */
  get joined(): boolean {
    return this.#phase === "running";
  }

  /** Decodes one message; `hasFd` says whether an fd came with it. Throws ProtocolError. */
  push(value: bigint, hasFd: boolean): ClientEvent[] {
    const out: ClientEvent[] = [];
    switch (this.#phase) {
      case "version":
        if (value !== BigInt(PROTOCOL_VERSION) || hasFd) {
          throw new ProtocolError(
            `expected protocol version ${PROTOCOL_VERSION} without fd: got ${value}${
              hasFd ? " with an fd" : ""
            }`,
          );
        }
        this.#phase = "id";
        return out;
      case "id":
        if (!isPeerId(value) || hasFd) {
          throw new ProtocolError(`expected own peer id 0..${MAX_PEER_ID} without fd: got ${value}`);
        }
        this.#id = Number(value);
        this.#phase = "shm";
        return out;
      case "shm":
        if (value !== BigInt(SHM_MESSAGE) || !hasFd) {
          throw new ProtocolError(`expected ${SHM_MESSAGE} with the shared memory fd: got ${value}`);
        }
        this.#phase = "initial";
        out.push({ type: "shm" });
        return out;
    }
    if (!isPeerId(value)) throw new ProtocolError(`expected a peer id 0..${MAX_PEER_ID}: got ${value}`);
    const peer = Number(value);
    if (peer !== this.#pending) this.#endRun(out);
    if (!hasFd) {
      if (peer === this.#id) throw new ProtocolError(`server announced our own id ${peer} as left`);
      if (!this.#peers.has(peer)) throw new ProtocolError(`server announced unknown peer ${peer} as left`);
      this.#peers.delete(peer);
      out.push({ type: "peer-left", peer });
      return out;
    }
    if (peer === this.#id) {
      if (this.#ownVectors >= MAX_VECTORS) throw new ProtocolError(`more than ${MAX_VECTORS} own vectors`);
      out.push({ type: "vector", peer, vector: this.#ownVectors++ });
      if (this.#phase === "initial") {
        this.#pending = peer;
        const known = this.#knownVectors();
        if (known !== null && this.#ownVectors >= known) this.#endRun(out);
      }
      return out;
    }
    const n = this.#peers.get(peer) ?? 0;
    if (n >= MAX_VECTORS) throw new ProtocolError(`more than ${MAX_VECTORS} vectors for peer ${peer}`);
    this.#peers.set(peer, n + 1);
    out.push({ type: "vector", peer, vector: n });
    if (this.#phase === "running" && (n === 0 || peer === this.#pending)) {
      this.#pending = peer;
      if (n + 1 >= this.#ownVectors) this.#endRun(out);
    } else if (this.#phase === "initial") {
      this.#pending = peer;
    }
    return out;
  }

  /** Call when no more data is ready now: the first peer's own run ends here. */
  flush(): ClientEvent[] {
    const out: ClientEvent[] = [];
    if (this.#phase === "initial" && this.#pending === this.#id) this.#endRun(out);
    return out;
  }

  /** The vector count existing peers showed, or null when there were none. */
  #knownVectors(): number | null {
    let known: number | null = null;
    for (const n of this.#peers.values()) known = Math.max(known ?? 0, n);
    return known;
  }

  #endRun(out: ClientEvent[]): void {
    const p = this.#pending;
    this.#pending = null;
    if (p === null) return;
    if (this.#phase === "initial") {
      // Existing peers' vectors come first; the run of our own ends the initial sequence.
      if (p === this.#id && this.#ownVectors > 0) {
        this.#phase = "running";
        out.push({
          type: "joined",
          id: this.#id,
          vectors: this.#ownVectors,
          peers: [...this.#peers.keys()].sort((a, b) => a - b),
        });
      }
      return;
    }
    if (p !== this.#id) out.push({ type: "peer-joined", peer: p, vectors: this.#peers.get(p) ?? 0 });
  }
}

const SIZE_UNITS: Record<string, number> = { "": 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/**
 * Parses a size like contrib ivshmem-server's `-l`: bytes, or a number with a K, M, G or T suffix
 * (powers of 1024, case-insensitive; "1.5G" allowed when it comes out a whole number of bytes).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(parseSize("4M"), 4194304);
 * assert.equal(parseSize("1.5k"), 1536);
 * ```
 */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)\s*$/i.exec(text);
  if (!m) throw new RangeError(`not a size: ${JSON.stringify(text)} (expected bytes or a K/M/G/T suffix)`);
  const bytes = Number(m[1]) * SIZE_UNITS[m[2].toUpperCase()];
  if (!Number.isSafeInteger(bytes)) throw new RangeError(`size is not a whole number of bytes: ${text}`);
  if (bytes <= 0) throw new RangeError(`size must be > 0: got ${text}`);
  return bytes;
}

/**
 * The smallest power of two >= `n` (QEMU's device needs a power-of-two BAR).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(roundUpPowerOfTwo(3 * 2 ** 30), 4294967296);
 * ```
 */
export function roundUpPowerOfTwo(n: number): number {
  if (!Number.isSafeInteger(n) || n <= 0) throw new RangeError(`size must be a positive integer: got ${n}`);
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/**
 * Parses a vector count like `-n` (decimal, or 0x hex as C's base-0 parse), 1..64.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * assert.equal(parseVectors("4"), 4);
 * assert.equal(parseVectors("0x10"), 16);
 * assert.throws(() => parseVectors("65"), { message: "must be 1..64: got 65" });
 * ```
 */
export function parseVectors(text: string): number {
  const t = text.trim();
  const n = /^0x[0-9a-f]+$/i.test(t) ? parseInt(t, 16) : /^\d+$/.test(t) ? parseInt(t, 10) : NaN;
  if (!Number.isInteger(n)) throw new RangeError(`not a number: ${JSON.stringify(text)}`);
  if (n < 1 || n > MAX_VECTORS) throw new RangeError(`must be 1..${MAX_VECTORS}: got ${n}`);
  return n;
}
