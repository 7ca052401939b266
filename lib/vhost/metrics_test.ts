import assert from "node:assert/strict";
import { connectUnix, Reactor } from "../../ffi/mod.ts";
import { LATENCY_BOUNDS_US, Metrics, MetricsServer } from "./metrics.ts";

Deno.test("metrics render Prometheus counters and a cumulative latency histogram per queue", () => {
  const m = new Metrics("block", 2);
  const q = m.queue(1);
  q.requests = 3;
  q.readBytes = 8192;
  q.errors = 1;
  q.observe(3); // <= 5 us
  q.observe(40); // <= 50 us
  q.observe(2e6); // +Inf
  const text = m.render();
  assert.match(text, /^# TYPE mpq_vhost_requests_total counter$/m);
  assert.match(text, /^mpq_vhost_requests_total\{device="block",queue="0"\} 0$/m);
  assert.match(text, /^mpq_vhost_requests_total\{device="block",queue="1"\} 3$/m);
  assert.match(text, /^mpq_vhost_read_bytes_total\{device="block",queue="1"\} 8192$/m);
  assert.match(text, /^mpq_vhost_errors_total\{device="block",queue="1"\} 1$/m);
  assert.match(
    text,
    /^mpq_vhost_request_latency_seconds_bucket\{device="block",queue="1",le="0.000005"\} 1$/m,
  );
  assert.match(
    text,
    /^mpq_vhost_request_latency_seconds_bucket\{device="block",queue="1",le="0.00005"\} 2$/m,
  );
  assert.match(text, /^mpq_vhost_request_latency_seconds_bucket\{device="block",queue="1",le="\+Inf"\} 3$/m);
  assert.match(text, /^mpq_vhost_request_latency_seconds_count\{device="block",queue="1"\} 3$/m);
  const buckets = text.split("\n").filter((l) => l.includes('queue="1",le='));
  assert.equal(buckets.length, LATENCY_BOUNDS_US.length + 1);
  assert.match(m.summary(), /3 requests, 8192 bytes read, 0 bytes written, 1 errors/);
});

Deno.test("metrics server answers every connection with the current text and closes it", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-metrics-" });
  const path = `${dir}/m.sock`;
  const reactor = new Reactor();
  const m = new Metrics("rng", 1);
  const server = new MetricsServer(path, { reactor, metrics: m });
  const running = reactor.run();
  try {
    for (const n of [0, 7]) {
      m.queue(0).requests = n;
      const s = connectUnix(path);
      const chunks: Uint8Array[] = [];
      const buf = new Uint8Array(65536);
      for (let i = 0; i < 1000; i++) {
        const r = s.recvMsg(buf);
        if (r === null) {
          await new Promise((res) => setTimeout(res, 5));
          continue;
        }
        if (r.bytes === 0) break;
        chunks.push(buf.slice(0, r.bytes));
      }
      s.close();
      const text = new TextDecoder().decode(new Uint8Array(chunks.flatMap((c) => [...c])));
      assert.match(text, new RegExp(`^mpq_vhost_requests_total\\{device="rng",queue="0"\\} ${n}$`, "m"));
    }
  } finally {
    reactor.stop();
    await running;
    server.close();
    reactor.close();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("metrics sources are read at each render, with their labels, and registered once", () => {
  const m = new Metrics("block", 2);
  let window = 8;
  m.addSource("mpq_vhost_poll_window_seconds", "Busy-poll window.", "gauge", () => [["", window / 1e6]]);
  m.addSource("mpq_vhost_poll_window_seconds", "again", "gauge", () => [["", 99]]);
  m.addSource("mpq_vhost_copy_helper_copies_total", "Helper copies.", "counter", () => [
    ['queue="0"', 5],
    ['queue="1"', 7],
  ]);
  let text = m.render();
  assert.match(text, /^# TYPE mpq_vhost_poll_window_seconds gauge$/m);
  assert.match(text, /^mpq_vhost_poll_window_seconds\{device="block"\} 0.000008$/m);
  assert.equal(text.match(/^mpq_vhost_poll_window_seconds/gm)?.length, 1, "registered once");
  assert.match(text, /^mpq_vhost_copy_helper_copies_total\{device="block",queue="1"\} 7$/m);
  window = 32;
  text = m.render();
  assert.match(text, /^mpq_vhost_poll_window_seconds\{device="block"\} 0.000032$/m);
});

Deno.test("metrics over shared memory: a queue thread's counts are rendered by the daemon's metrics", () => {
  const daemon = new Metrics("d0", 2);
  const thread = new Metrics("d0", 2, daemon.shared);
  thread.queue(1).requests += 3;
  thread.queue(1).observe(40);
  thread.countBroken();
  daemon.countBroken();
  assert.match(daemon.render(), /^mpq_vhost_requests_total\{device="d0",queue="1"\} 3$/m);
  assert.match(daemon.render(), /^mpq_vhost_request_latency_seconds_count\{device="d0",queue="1"\} 1$/m);
  assert.equal(daemon.brokenQueues, 2);
  assert.throws(() => new Metrics("d0", 3, daemon.shared), /shared metrics of \d+ bytes for 3 queues/);
});
