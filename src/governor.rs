//! Threads under contention: how many of a pool's threads a decode step runs on.
//!
//! ggml's threads meet at a spinning barrier after every op. When another process takes one of
//! the cores, the thread that shares it runs about half the time and every other thread spins
//! until it arrives: a decode step (one token, bound by memory, not arithmetic) then runs slower
//! on n threads than on n − 1 (measured on 2 cores with one busy: 1.52 tok/s on two threads, 2.06
//! on one). Prefill is bound by arithmetic and still gains from the shared core, so only decode
//! steps are governed.
//!
//! The governor watches the CPU time the process gets against what its threads would get if
//! each had a core. While that holds, every step runs on all threads and nothing is tried. When
//! it falls short, one thread fewer is tried for a window and kept if its steps are faster; the
//! full count is tried again after a pause (4 s) that doubles, up to a minute, each time it loses, so
//! a machine that turns quiet again gets all its threads back.

use std::time::{Duration, Instant};

/// Measurements are taken over windows of at least this long (and `MIN_STEPS` steps).
const WINDOW: Duration = Duration::from_millis(400);
const MIN_STEPS: usize = 2;
/// Below this share of the CPU time its threads should get, the process is contended.
const CONTENDED: f64 = 0.85;
/// A count must be this much faster per step to replace another.
const GAIN: f64 = 0.97;
const FIRST_PAUSE: Duration = Duration::from_secs(4);
const LONGEST_PAUSE: Duration = Duration::from_secs(64);

/// What the governor is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// All threads; trying fewer no sooner than `next_trial`.
    Full,
    /// One thread fewer than `kept`, on trial against its time per step.
    TrialDown { kept: f64 },
    /// Fewer threads (`kept`); all threads tried again at `next_trial`.
    Reduced,
    /// All threads again, on trial against `kept`'s time per step.
    TrialUp { kept: f64 },
}

/// One window's measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds per step.
    pub per_step: f64,
    /// CPU time the process got over what `threads` threads during steps and one thread between
    /// them would get (1.0: every thread had a core).
    pub share: f64,
}

pub struct Governor {
    max: usize,
    /// Threads of the next step.
    cur: usize,
    /// Threads of the last count that won (or `max`).
    kept: usize,
    phase: Phase,
    pause: Duration,
    next_trial: Instant,
    window: Option<Window>,
}

struct Window {
    start: Instant,
    /// The process's CPU time at `start` (None: not reported).
    cpu: Option<Duration>,
    busy: Duration,
    steps: usize,
}

impl Window {
    fn new(start: Instant) -> Window {
        Window {
            start,
            cpu: process_cpu_time(),
            busy: Duration::ZERO,
            steps: 0,
        }
    }
}

impl Governor {
    pub fn new(max: usize) -> Governor {
        let now = Instant::now();
        Governor {
            max: max.max(1),
            cur: max.max(1),
            kept: max.max(1),
            phase: Phase::Full,
            pause: FIRST_PAUSE,
            next_trial: now,
            window: None,
        }
    }

    /// Threads the next decode step should run on.
    pub fn threads(&self) -> usize {
        self.cur
    }

    /// Record one decode step that took `took` on `threads()` threads.
    pub fn record(&mut self, took: Duration) {
        if self.max == 1 {
            return;
        }
        // (The process's CPU time is read at the windows' edges only, not per step.)
        let now = Instant::now();
        let Some(w) = &mut self.window else {
            self.window = Some(Window::new(now));
            return;
        };
        w.busy += took;
        w.steps += 1;
        let elapsed = now - w.start;
        if elapsed < WINDOW || w.steps < MIN_STEPS {
            return;
        }
        let next = Window::new(now);
        let (Some(cpu), Some(start_cpu)) = (next.cpu, w.cpu) else {
            self.window = Some(next);
            return;
        };
        let expected =
            w.busy.as_secs_f64() * self.cur as f64 + elapsed.saturating_sub(w.busy).as_secs_f64();
        let sample = Sample {
            per_step: w.busy.as_secs_f64() / w.steps as f64,
            share: cpu.saturating_sub(start_cpu).as_secs_f64() / expected,
        };
        self.window = Some(next);
        self.observe(sample, now);
    }

    /// Move on from one window's sample.
    fn observe(&mut self, s: Sample, now: Instant) {
        let contended = s.share < CONTENDED;
        match self.phase {
            Phase::Full if contended && now >= self.next_trial => self.try_fewer(s.per_step),
            Phase::Full if !contended => self.pause = FIRST_PAUSE,
            Phase::Full | Phase::Reduced => {}
            Phase::TrialDown { kept } if s.per_step < kept * GAIN => {
                self.kept = self.cur;
                if self.cur > 1 && contended {
                    // Faster, and still short of CPU: one fewer again.
                    self.try_fewer(s.per_step);
                } else {
                    self.phase = Phase::Reduced;
                    self.next_trial = now + self.pause;
                }
            }
            Phase::TrialUp { kept } if s.per_step < kept * GAIN => {
                self.kept = self.max;
                self.phase = Phase::Full;
                self.pause = FIRST_PAUSE;
                self.next_trial = now;
            }
            Phase::TrialDown { .. } | Phase::TrialUp { .. } => {
                // The trial lost: back to the count kept, and no trial for a longer while.
                self.cur = self.kept;
                self.phase = if self.kept == self.max {
                    Phase::Full
                } else {
                    Phase::Reduced
                };
                self.pause = (self.pause * 2).min(LONGEST_PAUSE);
                self.next_trial = now + self.pause;
            }
        }
        if self.phase == Phase::Reduced && now >= self.next_trial {
            self.phase = Phase::TrialUp { kept: s.per_step };
            self.cur = self.max;
        }
    }

    fn try_fewer(&mut self, per_step: f64) {
        self.cur -= 1;
        self.phase = Phase::TrialDown { kept: per_step };
    }
}

/// CPU time (user + system) of this process so far, from /proc (Linux; None elsewhere, and
/// where the times read as zero, as under qemu-user, which does not report them).
fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // Linux reports them in USER_HZ, which is 100 on every architecture.
    (utime + stime > 0).then(|| Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(g: &mut Governor, per_step: f64, share: f64, at: Instant) {
        g.observe(Sample { per_step, share }, at);
    }

    #[test]
    fn a_quiet_machine_keeps_every_thread() {
        let (mut g, t) = (Governor::new(4), Instant::now());
        for i in 0..100 {
            step(&mut g, 0.3, 0.97, t + Duration::from_secs(i));
        }
        assert_eq!(g.threads(), 4);
    }

    /// `t` plus `s` seconds.
    fn at(t: Instant, s: f64) -> Instant {
        t + Duration::from_secs_f64(s)
    }

    #[test]
    fn contention_sheds_threads_while_it_pays_and_gets_them_back() {
        let (mut g, t, p) = (Governor::new(2), Instant::now(), FIRST_PAUSE.as_secs_f64());
        step(&mut g, 0.66, 0.75, t);
        assert_eq!(g.threads(), 1, "contended: one thread fewer is tried");
        step(&mut g, 0.49, 1.0, at(t, 0.5));
        assert_eq!(g.threads(), 1, "and kept, being faster");
        step(&mut g, 0.49, 1.0, at(t, 0.5 + p - 0.1));
        assert_eq!(g.threads(), 1, "no trial of all threads before the pause");
        step(&mut g, 0.49, 1.0, at(t, 0.5 + p));
        assert_eq!(g.threads(), 2, "all threads tried again after it");
        let lost = 1.0 + p;
        step(&mut g, 0.66, 0.75, at(t, lost));
        assert_eq!(g.threads(), 1, "still contended: back to fewer");
        step(&mut g, 0.49, 1.0, at(t, lost + p));
        step(&mut g, 0.49, 1.0, at(t, lost + 2.0 * p - 0.1));
        assert_eq!(g.threads(), 1, "the pause doubled: no trial yet");
        step(&mut g, 0.49, 1.0, at(t, lost + 2.0 * p));
        assert_eq!(g.threads(), 2, "trial after the doubled pause");
        step(&mut g, 0.30, 0.98, at(t, lost + 2.0 * p + 0.5));
        assert_eq!(
            g.threads(),
            2,
            "the machine is quiet again: all threads win and stay"
        );
        for i in 0..20 {
            step(&mut g, 0.30, 0.98, at(t, lost + 3.0 * p + i as f64));
        }
        assert_eq!(g.threads(), 2);
    }

    #[test]
    fn fewer_threads_that_lose_are_dropped_with_a_growing_pause() {
        let (mut g, t, p) = (Governor::new(2), Instant::now(), FIRST_PAUSE.as_secs_f64());
        step(&mut g, 0.40, 0.8, t);
        assert_eq!(g.threads(), 1);
        step(&mut g, 0.60, 1.0, at(t, 0.5));
        assert_eq!(g.threads(), 2, "one thread was slower: all threads again");
        step(&mut g, 0.40, 0.8, at(t, 0.5 + 2.0 * p - 0.1));
        assert_eq!(g.threads(), 2, "no new trial during the pause (doubled)");
        step(&mut g, 0.40, 0.8, at(t, 0.5 + 2.0 * p));
        assert_eq!(g.threads(), 1, "trial after it");
    }

    #[test]
    fn many_cores_step_down_one_at_a_time() {
        let (mut g, t) = (Governor::new(8), Instant::now());
        step(&mut g, 1.0, 0.6, t);
        assert_eq!(g.threads(), 7);
        step(&mut g, 0.9, 0.7, t + Duration::from_millis(500));
        assert_eq!(
            g.threads(),
            6,
            "faster but still contended: one fewer again"
        );
        step(&mut g, 0.95, 0.9, t + Duration::from_secs(1));
        assert_eq!(g.threads(), 7, "slower: back to the last count that won");
    }

    #[test]
    fn the_process_cpu_time_is_readable_and_grows() {
        let spin = || {
            let t = Instant::now();
            let mut x = 0u64;
            while t.elapsed() < Duration::from_millis(60) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        };
        spin();
        match process_cpu_time() {
            Some(a) => {
                spin();
                assert!(process_cpu_time().unwrap() > a);
            }
            // qemu-user writes zeros for the times in its /proc/self/stat: no information,
            // so the governor keeps every thread.
            None => assert!(
                std::env::var_os("PHI4_TEST_RUNNER").is_some(),
                "no CPU time on a native run"
            ),
        }
    }
}
