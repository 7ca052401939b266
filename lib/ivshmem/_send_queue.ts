/**
 * The server's per-peer outgoing queue. Private to lib/ivshmem.
 * @module
 */

/**
 * Messages waiting for one peer's socket, FIFO: a ring of (value, tag) in typed arrays, 5 bytes a
 * message (a join storm of 4000 peers queues tens of millions). The fd is found from the tag
 * when the message goes out. `sent` counts bytes of the head already written; once any byte went
 * out its fd went with it, and the server sets the head's tag to "no fd".
 */
export class SendQueue {
  #values = new Int32Array(16);
  #tags = new Uint8Array(16);
  #head = 0;
  #size = 0;
  sent = 0;

  get length(): number {
    return this.#size;
  }

  get headValue(): number {
    return this.#values[this.#head];
  }

  get headTag(): number {
    return this.#tags[this.#head];
  }

  set headTag(tag: number) {
    this.#tags[this.#head] = tag;
  }

  push(value: number, tag: number): void {
    const cap = this.#values.length;
    if (this.#size === cap) {
      const values = new Int32Array(cap * 2);
      const tags = new Uint8Array(cap * 2);
      for (let i = 0; i < this.#size; i++) {
        values[i] = this.#values[(this.#head + i) & (cap - 1)];
        tags[i] = this.#tags[(this.#head + i) & (cap - 1)];
      }
      this.#values = values;
      this.#tags = tags;
      this.#head = 0;
    }
    const at = (this.#head + this.#size) & (this.#values.length - 1);
    this.#values[at] = value;
    this.#tags[at] = tag;
    this.#size++;
  }

  /** Drops the head. */
  shift(): void {
    this.#head = (this.#head + 1) & (this.#values.length - 1);
    this.#size--;
    this.sent = 0;
    if (this.#size === 0 && this.#values.length > 1024) this.#reset();
  }

  /** Empties the queue, calling `each` for every message still in it. */
  drain(each: (value: number, tag: number) => void): void {
    const mask = this.#values.length - 1;
    for (let i = 0; i < this.#size; i++) {
      each(this.#values[(this.#head + i) & mask], this.#tags[(this.#head + i) & mask]);
    }
    this.#reset();
  }

  #reset(): void {
    this.#values = new Int32Array(16);
    this.#tags = new Uint8Array(16);
    this.#head = 0;
    this.#size = 0;
    this.sent = 0;
  }
}
