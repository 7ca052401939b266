/**
 * How the daemons' reactors sleep.
 * @module
 */

/**
 * How a daemon's reactor sleeps: "block" (its thread serves nothing but its fds: an event runs its
 * callback straight from epoll_wait), unless MPQ_REACTOR_WAKE names another mode (benchmarks).
 */
export function reactorWake(): "block" | "socket" | "thread" | "auto" {
  const w = Deno.env.get("MPQ_REACTOR_WAKE");
  return w === "socket" || w === "thread" || w === "auto" ? w : "block";
}
