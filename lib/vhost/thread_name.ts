/**
 * The Worker names of `mpq vhost` threads: main.ts, seeing one, runs the thread instead of the
 * command line (a module of its own, so main.ts loads nothing else to check it).
 * @module
 */

/** The name device threads are started with. */
export const DEVICE_THREAD_NAME = "mpq-vhost-device-thread";

/** The name queue threads (see queue_thread.ts) are started with. */
export const QUEUE_THREAD_NAME = "mpq-vhost-queue-thread";
