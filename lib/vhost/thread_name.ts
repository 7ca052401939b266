/**
 * The Worker name of a `mpq vhost serve` device thread: main.ts, seeing it, runs the thread instead
 * of the command line (a module of its own, so main.ts loads nothing else to check it).
 * @module
 */

/** The name device threads are started with. */
export const DEVICE_THREAD_NAME = "mpq-vhost-device-thread";
