/**
 * What the back-end makes of the byte stream a fuzz case sends, message by message: vhost-user
 * frames (12-byte header: request, flags, size; then `size` payload bytes), where a header with a
 * protocol version other than 1 or a payload over {@link MAX_PAYLOAD} ends the connection. The
 * runner uses it to know when the stream is at a message boundary (so the GET_FEATURES probe is
 * read as a message, not as someone's payload), how many GET_FEATURES replies to wait for, and
 * how many filler bytes bring a stream left mid-message (a header that lied about its size) back
 * to a boundary. Pure.
 * @module
 */

/** Header bytes. */
export const HEADER_SIZE = 12;
/** Largest payload a back-end accepts before giving up on the connection (mpq: 4096). */
export const MAX_PAYLOAD = 4096;
/** GET_FEATURES, the probe. */
export const GET_FEATURES = 1;

/**
 * @example
 * const f = new FramingModel();
 * f.feed(bytes);
 * if (!f.atBoundary) sock.send(f.filler());
 */
export class FramingModel {
  readonly #hdr = new Uint8Array(HEADER_SIZE);
  #hdrGot = 0;
  /** Payload bytes still to come for the current message (-1: reading a header). */
  #need = -1;
  #request = 0;
  /** Why the back-end is expected to have closed, or null. */
  closedBecause: string | null = null;
  /** Complete messages the back-end has read. */
  messages = 0;
  /** Complete GET_FEATURES messages (each gets exactly one reply). */
  getFeatures = 0;

  /** Whether the next byte starts a message (or the connection is expected to be closed). */
  get atBoundary(): boolean {
    return this.closedBecause !== null || (this.#need < 0 && this.#hdrGot === 0);
  }

  /** Runs `bytes` through the model. */
  feed(bytes: Uint8Array): void {
    let i = 0;
    while (i < bytes.byteLength && this.closedBecause === null) {
      if (this.#need < 0) {
        const take = Math.min(HEADER_SIZE - this.#hdrGot, bytes.byteLength - i);
        this.#hdr.set(bytes.subarray(i, i + take), this.#hdrGot);
        this.#hdrGot += take;
        i += take;
        if (this.#hdrGot < HEADER_SIZE) return;
        const v = new DataView(this.#hdr.buffer);
        this.#request = v.getUint32(0, true);
        const flags = v.getUint32(4, true);
        const size = v.getUint32(8, true);
        this.#hdrGot = 0;
        if ((flags & 3) !== 1) {
          this.closedBecause = `header of request ${this.#request} with version ${flags & 3}`;
          return;
        }
        if (size > MAX_PAYLOAD) {
          this.closedBecause = `header of request ${this.#request} claiming ${size} payload bytes`;
          return;
        }
        this.#need = size;
      } else {
        const take = Math.min(this.#need, bytes.byteLength - i);
        this.#need -= take;
        i += take;
      }
      if (this.#need === 0) this.#complete();
    }
  }

  #complete(): void {
    this.#need = -1;
    this.messages++;
    if (this.#request === GET_FEATURES) this.getFeatures++;
  }

  /**
   * Zero bytes that bring the stream to a boundary (empty when it is at one). A header completed
   * with zeros has version 0, so a back-end then closes; a payload is simply filled.
   */
  filler(): Uint8Array<ArrayBuffer> {
    if (this.atBoundary) return new Uint8Array(0);
    const n = this.#need >= 0 ? this.#need : HEADER_SIZE - this.#hdrGot;
    return new Uint8Array(n);
  }
}
