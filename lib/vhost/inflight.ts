/**
 * Inflight I/O tracking for split virtqueues (vhost-user.rst "Inflight I/O tracking"): a shared
 * memory area the back-end hands to the front-end (GET_INFLIGHT_FD), gets back on every start
 * (SET_INFLIGHT_FD), and survives a back-end crash, so requests in flight are resubmitted.
 *
 * Per queue (little endian):
 * ```
 * u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
 * struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
 * ```
 * each queue area rounded up to 64 bytes.
 * @module
 */

/** Alignment of each queue's area. */
export const INFLIGHT_ALIGNMENT = 64;
const HEADER = 16;
const DESC = 16;
/** Layout version written into a fresh area. */
export const INFLIGHT_VERSION = 1;

/** Bytes of one queue's inflight area for `queueSize` descriptors. */
export function inflightQueueSize(queueSize: number): number {
  const raw = HEADER + DESC * queueSize;
  return Math.ceil(raw / INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT;
}

/** Bytes of the whole inflight area. */
export function inflightAreaSize(numQueues: number, queueSize: number): number {
  return numQueues * inflightQueueSize(queueSize);
}

/**
 * One queue's view of the inflight area.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { ftruncate, mapShared, memfdCreate } from "../../ffi/mod.ts";
 *
 * using fd = memfdCreate("inflight"); // the area GET_INFLIGHT_FD hands to the front-end
 * ftruncate(fd, inflightAreaSize(1, 128));
 * using area = mapShared(fd, inflightAreaSize(1, 128));
 * const q = new InflightQueue(new DataView(area.bytes.buffer), { offset: 0, queueSize: 128 });
 * q.recover(0); // a fresh area: initialised, nothing to resubmit
 * q.begin(5); // popped
 * q.begin(9);
 * const batch = new Uint16Array([5]); // 5 completed
 * q.prepareBatch(batch, 1); // before the used index is published
 * q.finishBatch(batch, 1, 1); // after: used idx 1
 * // The back-end crashed; its successor gets the same area back and resubmits 9.
 * const again = new InflightQueue(new DataView(area.bytes.buffer), { offset: 0, queueSize: 128 });
 * assert.deepEqual(again.recover(1), [9]);
 * ```
 */
export class InflightQueue {
  readonly #v: DataView;
  readonly #base: number;
  readonly size: number;
  #counter = 0;

  constructor(view: DataView, layout: { offset: number; queueSize: number }) {
    const base = layout.offset;
    const queueSize = layout.queueSize;
    if (base + inflightQueueSize(queueSize) > view.byteLength) {
      throw new RangeError(
        `inflight area of ${view.byteLength} bytes too small for queue at ${base} with ${queueSize} descriptors`,
      );
    }
    this.#v = view;
    this.#base = base;
    this.size = queueSize;
  }

  get version(): number {
    return this.#v.getUint16(this.#base + 8, true);
  }
  get descNum(): number {
    return this.#v.getUint16(this.#base + 10, true);
  }
  get lastBatchHead(): number {
    return this.#v.getUint16(this.#base + 12, true);
  }
  get usedIdx(): number {
    return this.#v.getUint16(this.#base + 14, true);
  }

  /** Whether descriptor `head` is marked in flight. */
  isInflight(head: number): boolean {
    return this.#v.getUint8(this.#base + HEADER + DESC * head) === 1;
  }

  /** The submission counter of `head`. */
  counterOf(head: number): number {
    const o = this.#base + HEADER + DESC * head + 8;
    return this.#v.getUint32(o, true) + this.#v.getUint32(o + 4, true) * 4294967296;
  }

  /** Marks `head` in flight with the next submission counter. */
  begin(head: number): void {
    const o = this.#base + HEADER + DESC * head;
    const c = ++this.#counter;
    this.#v.setUint32(o + 8, c >>> 0, true);
    this.#v.setUint32(o + 12, Math.floor(c / 4294967296), true);
    this.#v.setUint8(o, 1);
  }

  /**
   * Before publishing a batch of used entries: links the batch (`heads[0..n)`) through `next` and
   * records its first head, so a crash between the used-idx store and {@link finishBatch} can be undone.
   */
  prepareBatch(heads: Uint16Array, n: number): void {
    if (n === 0) return;
    for (let i = 0; i + 1 < n; i++) {
      this.#v.setUint16(this.#base + HEADER + DESC * heads[i] + 6, heads[i + 1], true);
    }
    this.#v.setUint16(this.#base + 12, heads[0], true);
  }

  /** After the used index was published: clears the batch and records the new used index. */
  finishBatch(heads: Uint16Array, n: number, usedIdx: number): void {
    for (let i = 0; i < n; i++) this.#v.setUint8(this.#base + HEADER + DESC * heads[i], 0);
    this.#v.setUint16(this.#base + 14, usedIdx & 0xffff, true);
  }

  /**
   * Called when the queue starts with `ringUsedIdx` read from the used ring. A fresh area is
   * initialised (nothing to resubmit). Otherwise an interrupted batch is completed and the heads
   * still in flight are returned in submission order; the caller sets last_avail = used + count.
   */
  recover(ringUsedIdx: number): number[] {
    if (this.version === 0) {
      this.#v.setUint16(this.#base + 10, this.size, true);
      this.#v.setUint16(this.#base + 14, ringUsedIdx, true);
      this.#v.setUint16(this.#base + 8, INFLIGHT_VERSION, true);
      this.#counter = 0;
      return [];
    }
    this.#v.setUint16(this.#base + 10, this.size, true);
    const recorded = this.usedIdx;
    if (recorded !== ringUsedIdx) {
      // The last batch reached the used ring but was not cleared here: clear it now.
      let n = (ringUsedIdx - recorded) & 0xffff;
      let head = this.lastBatchHead;
      while (n-- > 0 && head < this.size) {
        const o = this.#base + HEADER + DESC * head;
        this.#v.setUint8(o, 0);
        head = this.#v.getUint16(o + 6, true);
      }
      this.#v.setUint16(this.#base + 14, ringUsedIdx, true);
    }
    const heads: number[] = [];
    let max = 0;
    for (let i = 0; i < this.size; i++) {
      if (this.isInflight(i)) {
        heads.push(i);
        max = Math.max(max, this.counterOf(i));
      }
    }
    heads.sort((a, b) => this.counterOf(a) - this.counterOf(b));
    this.#counter = max;
    return heads;
  }
}
