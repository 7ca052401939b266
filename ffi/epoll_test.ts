import assert from "node:assert/strict";
import { EventFd } from "./eventfd.ts";
import { Reactor, type Readiness } from "./epoll.ts";
import { getpid, kill, Signal } from "./process.ts";
import { socketPair } from "./socket.ts";

Deno.test("Reactor readable callback runs when data arrives; stop ends run()", async () => {
  using reactor = new Reactor();
  const [a, b] = socketPair();
  try {
    const got: number[] = [];
    const watch = reactor.add(b.fd, { readable: true }, (r) => {
      assert.equal(r.readable, true);
      const buf = new Uint8Array(8);
      const m = b.recvMsg(buf);
      if (m) got.push(...buf.subarray(0, m.bytes));
      if (got.length >= 3) reactor.stop();
    });
    assert.equal(reactor.size, 1);
    setTimeout(() => a.sendMsg(new Uint8Array([1, 2, 3])), 10);
    await reactor.run();
    assert.deepEqual(got, [1, 2, 3]);
    watch.remove();
    assert.equal(watch.active, false);
    assert.equal(reactor.size, 0);
  } finally {
    a.close();
    b.close();
  }
});

Deno.test("Reactor writable fires at once on an empty socket; modify switches to readable only", async () => {
  using reactor = new Reactor();
  const [a, b] = socketPair();
  try {
    const seen: Array<Partial<Readiness>> = [];
    const watch = reactor.add(a.fd, { writable: true }, (r) => {
      seen.push({ readable: r.readable, writable: r.writable });
      if (r.writable) {
        watch.modify({ readable: true });
        b.sendMsg(new Uint8Array([7]));
      } else if (r.readable) {
        a.recvMsg(new Uint8Array(1));
        reactor.stop();
      }
    });
    await reactor.run();
    assert.deepEqual(seen, [{ readable: false, writable: true }, { readable: true, writable: false }]);
  } finally {
    a.close();
    b.close();
  }
});

Deno.test("Reactor hangup is reported when the peer closes", async () => {
  using reactor = new Reactor();
  const [a, b] = socketPair();
  let hangup = false;
  reactor.add(b.fd, { readable: true }, (r) => {
    hangup = r.hangup;
    reactor.stop();
  });
  a.close();
  await reactor.run();
  b.close();
  assert.equal(hangup, true);
});

Deno.test("Reactor a removed watch's callback never runs again, even for collected events", async () => {
  using reactor = new Reactor();
  using e1 = new EventFd();
  using e2 = new EventFd();
  const calls: string[] = [];
  // Both become readable in the same epoll_wait; whichever runs first removes the other.
  const w1 = reactor.add(e1.fd, { readable: true }, () => {
    calls.push("e1");
    w2.remove();
    e1.drain();
    setTimeout(() => reactor.stop(), 20);
  });
  const w2 = reactor.add(e2.fd, { readable: true }, () => {
    calls.push("e2");
    w1.remove();
    e2.drain();
    setTimeout(() => reactor.stop(), 20);
  });
  e1.signal();
  e2.signal();
  await reactor.run();
  assert.equal(calls.length, 1, `exactly one callback ran: ${calls}`);
});

Deno.test("Reactor stop with nothing registered resolves run() with no epoll_wait left in flight", async () => {
  using reactor = new Reactor();
  const t = setTimeout(() => reactor.stop(), 30);
  await reactor.run();
  clearTimeout(t);
  assert.equal(reactor.stopping, true);
  // Deno's op sanitizer fails this test if the nonblocking epoll_wait were still pending.
});

Deno.test("Reactor a throwing callback makes run() reject with that error", async () => {
  using reactor = new Reactor();
  using ev = new EventFd();
  reactor.add(ev.fd, { readable: true }, () => {
    throw new Error("callback failed on purpose");
  });
  ev.signal();
  await assert.rejects(reactor.run(), /callback failed on purpose/);
});

Deno.test("Reactor with onError keeps running after a callback throws", async () => {
  const errors: unknown[] = [];
  using reactor = new Reactor({ onError: (e) => errors.push(e) });
  using ev = new EventFd();
  let calls = 0;
  reactor.add(ev.fd, { readable: true }, () => {
    ev.drain();
    calls++;
    if (calls === 1) {
      ev.signal();
      throw new Error("first");
    }
    reactor.stop();
  });
  ev.signal();
  await reactor.run();
  assert.equal(calls, 2);
  assert.equal(errors.length, 1);
  assert.match(String(errors[0]), /first/);
});

Deno.test("Reactor routes SIGUSR1 sent to this process to onSignal and removes the listener after", async () => {
  using reactor = new Reactor();
  let got = 0;
  reactor.onSignal("SIGUSR1", () => {
    got++;
    reactor.stop();
  });
  setTimeout(() => kill(getpid(), Signal.SIGUSR1), 20);
  await reactor.run();
  assert.equal(got, 1);
});

Deno.test("Reactor run twice at once and close while running are refused", async () => {
  using reactor = new Reactor();
  const running = reactor.run();
  await assert.rejects(reactor.run(), /already running/);
  assert.throws(() => reactor.close(), /while run\(\) is in flight/);
  reactor.stop();
  await running;
});

for (const wake of ["socket", "thread", "block"] as const) {
  Deno.test(`Reactor (${wake} wake-up) sleeps until an fd is ready, many times, and stops with nothing pending`, async () => {
    using reactor = new Reactor({ wake });
    const [a, b] = socketPair();
    try {
      let got = 0;
      reactor.add(b.fd, { readable: true }, () => {
        while (b.recvMsg(new Uint8Array(64))) got++;
        if (got >= 50) reactor.stop();
        else setTimeout(() => a.sendMsg(new Uint8Array([1])), 1);
      });
      setTimeout(() => a.sendMsg(new Uint8Array([1])), 5);
      await reactor.run();
      assert.equal(got, 50);
    } finally {
      a.close();
      b.close();
    }
  });
}

for (const wake of ["auto", "block"] as const) {
  Deno.test(`Reactor (${wake}) busy-polling: pollers run back to back, fd events and timers still get through`, async () => {
    using reactor = new Reactor({ wake });
    const ev = new EventFd({ label: "poll test" });
    try {
      let polls = 0;
      let events = 0;
      let timerFired = false;
      // A poller that always reports work keeps the reactor awake for the whole test.
      const remove = reactor.addPoller(() => {
        polls++;
        return true;
      });
      reactor.add(ev.fd, { readable: true }, () => {
        ev.drain();
        events++;
      });
      setTimeout(() => {
        timerFired = true;
        ev.signal();
      }, 20);
      setTimeout(() => reactor.stop(), 60);
      const t0 = performance.now();
      await reactor.run();
      const ms = performance.now() - t0;
      remove();
      assert.equal(timerFired, true, "timers run while busy");
      assert.equal(events, 1, "an fd event is seen while busy");
      assert.ok(ms < 1000, `stop() was seen promptly (${ms.toFixed(0)} ms)`);
      assert.ok(polls > 1000, `the poller ran back to back (${polls} times in ${ms.toFixed(0)} ms)`);
    } finally {
      ev.close();
    }
  });
}

Deno.test("Reactor (block wake-up) runs a callback's promise chain, timers and signals", async () => {
  using reactor = new Reactor({ wake: "block" });
  const [a, b] = socketPair();
  try {
    const steps: string[] = [];
    reactor.add(b.fd, { readable: true }, () => {
      while (b.recvMsg(new Uint8Array(64))) { /* drain */ }
      // A reply several promise steps away (as a drained ring stop's reply is): it must not wait
      // for the next fd event or for the end of a sleep slice.
      Promise.resolve().then(() => 1).then((x) => x + 1).then((x) => x + 1).then((x) => {
        steps.push(`chain ${x} at ${Math.round(performance.now() - sent)} ms`);
        b.sendMsg(new Uint8Array([2]));
      });
    });
    let sent = 0;
    let replies = 0;
    reactor.add(a.fd, { readable: true }, () => {
      while (a.recvMsg(new Uint8Array(64))) replies++;
      reactor.stop();
    });
    // A signal (delivered between slices) sends the byte that starts the chain.
    let signalled = false;
    reactor.onSignal("SIGUSR2", () => {
      signalled = true;
      sent = performance.now();
      a.sendMsg(new Uint8Array([1]));
    });
    setTimeout(() => Deno.kill(Deno.pid, "SIGUSR2"), 5);
    await reactor.run();
    assert.equal(signalled, true);
    assert.equal(replies, 1);
    assert.equal(steps.length, 1, "the promise chain ran to its end and its reply was seen");
  } finally {
    a.close();
    b.close();
  }
});
