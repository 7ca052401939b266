/**
 * A one-way channel of JSON messages between two threads in a SharedArrayBuffer: a ring of
 * fixed-size slots, one writer and one reader, indexes moved with Atomics. Used with an eventfd
 * the reader's reactor watches, it carries a queue thread's requests and replies without
 * postMessage, whose delivery waits for an event-loop turn that a thread sleeping in a blocking
 * epoll_wait does not take for up to hundreds of milliseconds.
 * @module
 */

/** Bytes of one slot (a message's JSON text must fit, after a 4-byte length). */
export const SLOT_BYTES = 16 * 1024;
/** Slots in a mailbox. */
export const SLOTS = 64; // a power of two

/** The memory of a new mailbox (hand it to the other thread with postMessage). */
export function mailboxMemory(): SharedArrayBuffer {
  return new SharedArrayBuffer(8 + SLOTS * SLOT_BYTES);
}

/**
 * One end of a mailbox (make both ends from the same memory, one per thread).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const memory = mailboxMemory();
 * const writer = new Mailbox(memory), reader = new Mailbox(memory);
 * writer.send({ seq: 1, op: "connect" });
 * writer.send({ seq: 2, op: "message" });
 * assert.deepEqual(reader.peek(), { seq: 1, op: "connect" });
 * reader.take();
 * assert.deepEqual(reader.peek(), { seq: 2, op: "message" });
 * reader.take();
 * assert.equal(reader.peek(), undefined);
 * ```
 */
export class Mailbox {
  /** [0] slots read, [1] slots written (both only grow, modulo 2^31). */
  readonly #index: Int32Array;
  readonly #bytes: Uint8Array;
  readonly #view: DataView;
  readonly #encoder = new TextEncoder();
  readonly #decoder = new TextDecoder();

  constructor(memory: SharedArrayBuffer) {
    if (memory.byteLength !== 8 + SLOTS * SLOT_BYTES) {
      throw new RangeError(
        `mailbox memory of ${memory.byteLength} bytes: expected ${8 + SLOTS * SLOT_BYTES}`,
      );
    }
    this.#index = new Int32Array(memory, 0, 2);
    this.#bytes = new Uint8Array(memory, 8);
    this.#view = new DataView(memory, 8);
  }

  /** Appends a message; throws when it is too big for a slot or every slot is full. */
  send(message: unknown): void {
    const text = this.#encoder.encode(JSON.stringify(message));
    if (text.byteLength > SLOT_BYTES - 4) {
      throw new RangeError(`mailbox message of ${text.byteLength} bytes (at most ${SLOT_BYTES - 4})`);
    }
    const read = Atomics.load(this.#index, 0);
    const written = Atomics.load(this.#index, 1);
    if (((written - read) | 0) >= SLOTS) throw new RangeError(`mailbox full (${SLOTS} messages unread)`);
    const at = (written & (SLOTS - 1)) * SLOT_BYTES;
    this.#view.setUint32(at, text.byteLength, true);
    this.#bytes.set(text, at + 4);
    Atomics.store(this.#index, 1, (written + 1) | 0);
  }

  /** The oldest unread message (undefined: none), left in the mailbox. */
  peek(): unknown {
    const read = Atomics.load(this.#index, 0);
    if (read === Atomics.load(this.#index, 1)) return undefined;
    const at = (read & (SLOTS - 1)) * SLOT_BYTES;
    const len = this.#view.getUint32(at, true);
    // Copied out: TextDecoder does not read shared memory.
    return JSON.parse(this.#decoder.decode(this.#bytes.slice(at + 4, at + 4 + len)));
  }

  /** Drops the oldest unread message. */
  take(): void {
    const read = Atomics.load(this.#index, 0);
    if (read !== Atomics.load(this.#index, 1)) Atomics.store(this.#index, 0, (read + 1) | 0);
  }
}
