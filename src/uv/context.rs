//! State the layers above the loop keep *in* the loop: one context value
//! per type ([`Loop::context_mut`]), and [`Ids`], the generational table
//! that names each object in it by a typed, copyable [`Id`] the way the
//! loop names its handles.
//!
//! This is how every layer owns its objects (ARCHITECTURE.md, *One model
//! for every layer*): `net` keeps its servers in an `Ids<ServerState>`
//! inside its context, and a `net::Server` is an `Id` in a newtype.
//! Callbacks receive `&mut Loop`, reach the state through the context, and
//! are called through [`Loop::call_slot`], so there is no `Rc<RefCell<_>>`
//! object graph and no `Weak` back-pointer: a stale id is the only way to
//! name an object that is gone, and it is detected, never a hit on another
//! object.

use std::any::{Any, TypeId};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use slab::Slab;

use super::event_loop::Loop;

/// A typed, generational id for an object kept in an [`Ids<T>`]: a slot
/// index and the generation the slot had when the object was inserted.
/// Copying an id does not copy the object; an id whose object was removed
/// (even if its slot now holds another) finds nothing.
pub struct Id<T> {
    index: u32,
    gen_: u32,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Id<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Id<T> {}
impl<T> PartialEq for Id<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.index, self.gen_) == (other.index, other.gen_)
    }
}
impl<T> Eq for Id<T> {}
impl<T> Hash for Id<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.index, self.gen_).hash(state)
    }
}
impl<T> fmt::Debug for Id<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({}#{})", self.index, self.gen_)
    }
}

/// A table of objects named by typed generational ids: a `slab` whose
/// entries carry the generation they were inserted with, as the loop's
/// handle table does. Lookups are an index and a compare.
///
/// Generations come from one counter per table, bumped on every insert, so
/// an id removed and a new id for the same slot differ (until 2^32 inserts
/// later).
///
/// # Examples
///
/// ```
/// use uvcluster::uv::Ids;
///
/// let mut names: Ids<String> = Ids::new();
/// let a = names.insert("a".to_owned());
/// assert_eq!(names.get(a).map(String::as_str), Some("a"));
/// assert_eq!(names.remove(a).as_deref(), Some("a"));
/// let b = names.insert("b".to_owned()); // reuses a's slot
/// assert!(names.get(a).is_none(), "a stale id finds nothing");
/// assert!(names.contains(b));
/// ```
pub struct Ids<T> {
    slots: Slab<(u32, T)>,
    next_gen: u32,
}

impl<T> Ids<T> {
    /// An empty table.
    pub fn new() -> Self {
        Ids {
            slots: Slab::new(),
            next_gen: 1,
        }
    }

    /// Inserts `value` and returns its id.
    ///
    /// # Panics
    ///
    /// With more than 2^32 objects in the table at once.
    pub fn insert(&mut self, value: T) -> Id<T> {
        let gen_ = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let index = self.slots.insert((gen_, value));
        Id {
            index: u32::try_from(index).expect("more than 2^32 objects"),
            gen_,
            _t: PhantomData,
        }
    }

    /// The object `id` names, if it is still in the table.
    pub fn get(&self, id: Id<T>) -> Option<&T> {
        match self.slots.get(id.index as usize) {
            Some((g, v)) if *g == id.gen_ => Some(v),
            _ => None,
        }
    }

    /// The object `id` names, mutably, if it is still in the table.
    pub fn get_mut(&mut self, id: Id<T>) -> Option<&mut T> {
        match self.slots.get_mut(id.index as usize) {
            Some((g, v)) if *g == id.gen_ => Some(v),
            _ => None,
        }
    }

    /// Whether `id` names an object in the table.
    pub fn contains(&self, id: Id<T>) -> bool {
        self.get(id).is_some()
    }

    /// Removes the object `id` names and returns it; `None` for a stale id.
    pub fn remove(&mut self, id: Id<T>) -> Option<T> {
        self.get(id)?;
        Some(self.slots.remove(id.index as usize).1)
    }

    /// The number of objects in the table.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Every object with its id, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Id<T>, &T)> {
        self.slots.iter().map(|(index, (gen_, v))| {
            (
                Id {
                    index: index as u32,
                    gen_: *gen_,
                    _t: PhantomData,
                },
                v,
            )
        })
    }

    /// Every object with its id, mutably, in slot order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Id<T>, &mut T)> {
        self.slots.iter_mut().map(|(index, (gen_, v))| {
            (
                Id {
                    index: index as u32,
                    gen_: *gen_,
                    _t: PhantomData,
                },
                v,
            )
        })
    }

    /// The ids of every object, in slot order: a snapshot to walk while
    /// calling back into the loop.
    pub fn ids(&self) -> Vec<Id<T>> {
        self.iter().map(|(id, _)| id).collect()
    }
}

impl<T> Default for Ids<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Ids<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ids").field("len", &self.len()).finish()
    }
}

/// The loop's per-type context values (see [`Loop::context_mut`]).
#[derive(Default)]
pub(crate) struct Contexts {
    /// Few entries (one per layer), so a list beats a hash map.
    entries: Vec<(TypeId, Box<dyn Any>)>,
}

impl Contexts {
    fn position<T: 'static>(&self) -> Option<usize> {
        let id = TypeId::of::<T>();
        self.entries.iter().position(|(t, _)| *t == id)
    }
}

impl Loop {
    /// The loop's context value of type `T`, if one was made. See
    /// [`context_mut`](Self::context_mut).
    pub fn context<T: 'static>(&self) -> Option<&T> {
        let c = &self.contexts;
        let i = c.position::<T>()?;
        c.entries[i].1.downcast_ref()
    }

    /// The loop's context value of type `T`, made with `T::default()` the
    /// first time it is asked for.
    ///
    /// A context is where a layer above the loop keeps its state so that
    /// the loop owns it, as it owns its handles: one value per type
    /// (use a private type, so that no other code can reach it), usually
    /// holding [`Ids`] tables of the layer's objects and their
    /// [`CallbackSlot`](super::CallbackSlot)s. It lives as long as the loop
    /// and is dropped with it. Callbacks reach it through the `&mut Loop`
    /// they receive; call the callbacks it stores with
    /// [`call_slot`](Self::call_slot), which keeps no borrow of it while
    /// they run.
    ///
    /// # Examples
    ///
    /// ```
    /// use uvcluster::uv::{Id, Ids, Loop};
    ///
    /// #[derive(Default)]
    /// struct Counters(Ids<u64>);
    ///
    /// let mut lp = Loop::new()?;
    /// let id: Id<u64> = lp.context_mut::<Counters>().0.insert(0);
    /// *lp.context_mut::<Counters>().0.get_mut(id).unwrap() += 1;
    /// assert_eq!(lp.context::<Counters>().unwrap().0.get(id), Some(&1));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn context_mut<T: Default + 'static>(&mut self) -> &mut T {
        let i = match self.contexts.position::<T>() {
            Some(i) => i,
            None => {
                self.contexts
                    .entries
                    .push((TypeId::of::<T>(), Box::new(T::default())));
                self.contexts.entries.len() - 1
            }
        };
        self.contexts.entries[i]
            .1
            .downcast_mut()
            .expect("a context entry holds the type it is keyed by")
    }

    /// Removes the loop's context value of type `T` and returns it.
    pub fn take_context<T: 'static>(&mut self) -> Option<T> {
        let i = self.contexts.position::<T>()?;
        let (_, v) = self.contexts.entries.swap_remove(i);
        v.downcast().ok().map(|b| *b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_ids_find_nothing() {
        let mut t: Ids<&str> = Ids::new();
        let a = t.insert("a");
        let b = t.insert("b");
        assert_eq!(t.len(), 2);
        assert_eq!(t.remove(a), Some("a"));
        assert_eq!(t.remove(a), None, "removed once");
        let c = t.insert("c");
        assert_eq!(t.get(a), None, "a's slot now holds c");
        assert_eq!(t.get(c), Some(&"c"));
        assert_ne!(a, c);
        assert_eq!(t.ids(), vec![c, b]);
        for (_, v) in t.iter_mut() {
            *v = "x";
        }
        assert_eq!(t.iter().map(|(_, v)| *v).collect::<Vec<_>>(), ["x", "x"]);
    }

    #[derive(Default, Debug, PartialEq)]
    struct A(u32);
    #[derive(Default, Debug, PartialEq)]
    struct B(&'static str);

    #[test]
    fn one_context_per_type() {
        let mut lp = Loop::new().unwrap();
        assert!(lp.context::<A>().is_none());
        lp.context_mut::<A>().0 = 7;
        lp.context_mut::<B>().0 = "b";
        assert_eq!(lp.context::<A>(), Some(&A(7)));
        assert_eq!(lp.context::<B>(), Some(&B("b")));
        assert_eq!(lp.take_context::<A>(), Some(A(7)));
        assert!(lp.context::<A>().is_none());
        assert_eq!(lp.context_mut::<A>(), &mut A(0), "made afresh");
        assert_eq!(lp.context::<B>(), Some(&B("b")));
    }
}
