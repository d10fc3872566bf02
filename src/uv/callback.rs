//! The one way a callback that runs more than once is stored and called,
//! for the loop's handles and for every layer above: a [`CallbackSlot`]
//! holds it; to call it, take it out, call it with `&mut Loop`, and put it
//! back unless the slot was replaced or cleared meanwhile, or its owner is
//! gone ([`Loop::call_slot`]).
//!
//! Taking the callback out is what lets it run with `&mut Loop`: while it
//! runs, nothing borrows the state it lives in, so it may start, stop or
//! close anything, its own owner included, and set a new callback in its
//! own slot. The version number is what makes "put back" safe: any `set`
//! or `clear` while the callback is out bumps it, so the callback that was
//! taken never overwrites the one that replaced it, nor revives one that
//! was stopped.

use std::fmt;
use std::ops::{Deref, DerefMut};

use super::event_loop::Loop;

/// Where a callback that runs more than once lives: a handle's read or
/// timer callback, a server's connection callback, a channel's message
/// callback. `F` is the callback's unsized type, such as
/// `dyn FnMut(&mut Loop, Handle<Timer>)`.
///
/// A slot is set ([`set`](Self::set)), emptied ([`clear`](Self::clear)),
/// and called through [`Loop::call_slot`], or by hand with
/// [`take`](Self::take) and [`put_back`](Self::put_back) when something
/// must happen between taking the callback out and calling it.
///
/// # Examples
///
/// A counter that lives in the loop (see [`Loop::context_mut`]) and whose
/// callback replaces itself the second time it runs:
///
/// ```
/// use uvcluster::uv::{CallbackSlot, Loop};
///
/// #[derive(Default)]
/// struct Ticker {
///     on_tick: CallbackSlot<dyn FnMut(&mut Loop, u32)>,
///     ticks: u32,
/// }
///
/// fn tick(lp: &mut Loop) {
///     let n = {
///         let t = lp.context_mut::<Ticker>();
///         t.ticks += 1;
///         t.ticks
///     };
///     lp.call_slot(|lp| Some(&mut lp.context_mut::<Ticker>().on_tick), |lp, f| f(lp, n));
/// }
///
/// let mut lp = Loop::new()?;
/// lp.context_mut::<Ticker>().on_tick.set(Box::new(|lp, n| {
///     println!("tick {n}");
///     if n == 2 {
///         // Replaced while it runs: the new callback stays.
///         lp.context_mut::<Ticker>().on_tick.set(Box::new(|_, n| println!("late tick {n}")));
///     }
/// }));
/// tick(&mut lp);
/// tick(&mut lp);
/// tick(&mut lp); // prints "late tick 3"
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct CallbackSlot<F: ?Sized> {
    cb: Option<Box<F>>,
    /// Bumped by every `set` and `clear`; a taken callback goes back only
    /// if it is unchanged.
    version: u32,
}

/// A callback taken out of its [`CallbackSlot`]: call it through `Deref`
/// (`(*taken)(lp, ..)` or `taken(lp, ..)` for closures), then hand it to
/// [`CallbackSlot::put_back`].
pub struct Taken<F: ?Sized> {
    cb: Box<F>,
    version: u32,
}

impl<F: ?Sized> CallbackSlot<F> {
    /// An empty slot.
    pub const fn empty() -> Self {
        CallbackSlot {
            cb: None,
            version: 0,
        }
    }

    /// A slot holding `cb`.
    pub fn new(cb: Box<F>) -> Self {
        CallbackSlot {
            cb: Some(cb),
            version: 0,
        }
    }

    /// Sets the callback, replacing any other. Called while the slot's
    /// callback is taken out (from inside it), the new one wins: the taken
    /// one is not put back.
    pub fn set(&mut self, cb: Box<F>) {
        self.cb = Some(cb);
        self.version = self.version.wrapping_add(1);
    }

    /// Empties the slot and returns what it held. Called while the
    /// callback is taken out, it keeps it from being put back: this is
    /// how a stop or a close inside a callback sticks.
    pub fn clear(&mut self) -> Option<Box<F>> {
        self.version = self.version.wrapping_add(1);
        self.cb.take()
    }

    /// Whether the slot holds a callback (not while it is taken out).
    pub fn is_set(&self) -> bool {
        self.cb.is_some()
    }

    /// Takes the callback out to call it; `None` if the slot is empty (or
    /// the callback is already out, in a call further up the stack).
    pub fn take(&mut self) -> Option<Taken<F>> {
        self.cb.take().map(|cb| Taken {
            cb,
            version: self.version,
        })
    }

    /// Puts a taken callback back, unless the slot was set or cleared since
    /// it was taken; then the callback is dropped. Returns whether it went
    /// back.
    pub fn put_back(&mut self, taken: Taken<F>) -> bool {
        if self.version == taken.version && self.cb.is_none() {
            self.cb = Some(taken.cb);
            true
        } else {
            false
        }
    }
}

impl<F: ?Sized> Default for CallbackSlot<F> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<F: ?Sized> fmt::Debug for CallbackSlot<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackSlot")
            .field("set", &self.cb.is_some())
            .finish()
    }
}

impl<F: ?Sized> Deref for Taken<F> {
    type Target = F;
    fn deref(&self) -> &F {
        &self.cb
    }
}

impl<F: ?Sized> DerefMut for Taken<F> {
    fn deref_mut(&mut self) -> &mut F {
        &mut self.cb
    }
}

impl<F: ?Sized> fmt::Debug for Taken<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Taken")
    }
}

impl Loop {
    /// Calls the callback in the slot that `slot` finds: takes it out, calls
    /// `call` with the loop and the callback, and puts it back unless, by
    /// then, the slot was set or cleared (the callback replaced or
    /// stopped) or `slot` no longer finds it (its owner was closed or
    /// removed). Returns `call`'s result, or `None` if there was no
    /// callback to call (no slot, an empty slot, or one whose callback is
    /// already running further up the stack).
    ///
    /// This is the loop's own way of calling a handle's callbacks, and the
    /// one the layers above use for state they keep in the loop
    /// ([`context_mut`](Loop::context_mut)): `slot` is a path from the loop
    /// to the slot, evaluated once before the call and once after it, so
    /// nothing is borrowed while the callback runs and it may do anything
    /// with the loop, including removing its own owner.
    ///
    /// # Examples
    ///
    /// See [`CallbackSlot`].
    pub fn call_slot<F: ?Sized, R>(
        &mut self,
        slot: impl for<'a> Fn(&'a mut Loop) -> Option<&'a mut CallbackSlot<F>>,
        call: impl FnOnce(&mut Loop, &mut F) -> R,
    ) -> Option<R> {
        let mut taken = slot(self)?.take()?;
        let r = call(self, &mut taken);
        if let Some(s) = slot(self) {
            s.put_back(taken);
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    type Cb = dyn FnMut(&mut Loop, &str);

    #[derive(Default)]
    struct Owner {
        slot: CallbackSlot<Cb>,
        alive: bool,
    }

    fn slot(lp: &mut Loop) -> Option<&mut CallbackSlot<Cb>> {
        let o = lp.context_mut::<Owner>();
        o.alive.then_some(&mut o.slot)
    }

    fn fire(lp: &mut Loop, what: &str) -> bool {
        lp.call_slot(slot, |lp, f| f(lp, what)).is_some()
    }

    fn setup(lp: &mut Loop, cb: Box<Cb>) {
        let o = lp.context_mut::<Owner>();
        o.alive = true;
        o.slot.set(cb);
    }

    #[test]
    fn a_callback_goes_back_after_its_call() {
        let mut lp = Loop::new().unwrap();
        let n = Rc::new(Cell::new(0));
        let c = n.clone();
        setup(&mut lp, Box::new(move |_, _| c.set(c.get() + 1)));
        assert!(fire(&mut lp, "a"));
        assert!(fire(&mut lp, "b"));
        assert_eq!(n.get(), 2);
        assert!(lp.context_mut::<Owner>().slot.is_set());
    }

    #[test]
    fn a_callback_replaced_while_it_runs_stays_replaced() {
        let mut lp = Loop::new().unwrap();
        let log = Rc::new(std::cell::RefCell::new(Vec::new()));
        let l = log.clone();
        setup(
            &mut lp,
            Box::new(move |lp, what| {
                l.borrow_mut().push(format!("old {what}"));
                let l2 = l.clone();
                slot(lp).unwrap().set(Box::new(move |_, w| {
                    l2.borrow_mut().push(format!("new {w}"))
                }));
            }),
        );
        fire(&mut lp, "1");
        fire(&mut lp, "2");
        assert_eq!(*log.borrow(), ["old 1", "new 2"]);
    }

    #[test]
    fn a_callback_cleared_while_it_runs_stays_cleared() {
        let mut lp = Loop::new().unwrap();
        let n = Rc::new(Cell::new(0));
        let c = n.clone();
        setup(
            &mut lp,
            Box::new(move |lp, _| {
                c.set(c.get() + 1);
                // A stop inside the callback: clear, then set and clear again.
                slot(lp).unwrap().clear();
                slot(lp).unwrap().set(Box::new(|_, _| panic!("never")));
                slot(lp).unwrap().clear();
            }),
        );
        assert!(fire(&mut lp, "x"));
        assert!(!fire(&mut lp, "y"), "nothing to call");
        assert_eq!(n.get(), 1);
    }

    #[test]
    fn a_callback_whose_owner_went_away_is_dropped() {
        let mut lp = Loop::new().unwrap();
        let token = Rc::new(());
        let t = token.clone();
        setup(
            &mut lp,
            Box::new(move |lp, _| {
                let _ = &t;
                lp.context_mut::<Owner>().alive = false;
            }),
        );
        assert!(fire(&mut lp, "x"));
        assert_eq!(Rc::strong_count(&token), 1, "the callback was dropped");
        assert!(!lp.context_mut::<Owner>().slot.is_set());
    }

    #[test]
    fn a_nested_call_finds_the_slot_empty() {
        let mut lp = Loop::new().unwrap();
        let depth = Rc::new(Cell::new(0));
        let d = depth.clone();
        setup(
            &mut lp,
            Box::new(move |lp, _| {
                d.set(d.get() + 1);
                assert!(!fire(lp, "inner"), "the callback is out: no recursion");
            }),
        );
        assert!(fire(&mut lp, "outer"));
        assert_eq!(depth.get(), 1);
        assert!(fire(&mut lp, "again"), "and it went back");
    }

    #[test]
    fn put_back_by_hand() {
        let mut s: CallbackSlot<dyn Fn() -> u8> = CallbackSlot::new(Box::new(|| 7));
        let t = s.take().unwrap();
        assert_eq!(t(), 7);
        assert!(s.put_back(t));
        let t = s.take().unwrap();
        s.set(Box::new(|| 8));
        assert!(!s.put_back(t), "replaced meanwhile");
        assert_eq!(s.take().map(|t| t()), Some(8));
    }
}
