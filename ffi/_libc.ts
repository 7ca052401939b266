/**
 * Opens libc once. Private to ffi/.
 * @module
 */
import { SYMBOLS } from "./_symbols.ts";

/** The loaded libc symbols. */
export const libc = Deno.dlopen("libc.so.6", SYMBOLS).symbols;

const encoder = new TextEncoder();

/** A NUL-terminated copy of `s` for C. */
export function cstr(s: string): Uint8Array<ArrayBuffer> {
  const bytes = encoder.encode(s);
  if (bytes.includes(0)) throw new TypeError(`string for C contains a NUL byte: ${JSON.stringify(s)}`);
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}

/** Address of a buffer as bigint (0n for an empty one). */
export function addressOf(buf: BufferSource): bigint {
  const p = Deno.UnsafePointer.of(buf);
  return p === null ? 0n : BigInt(Deno.UnsafePointer.value(p));
}
