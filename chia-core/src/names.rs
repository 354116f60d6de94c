//! "Did you mean …?" for names a user typed: configuration fields, sections, functions.
//!
//! The distance is the optimal string alignment distance (Levenshtein's insertions, deletions
//! and substitutions, plus a swap of two adjacent characters as one edit), because swapped
//! letters (`tgas`) are among the most common typos and plain Levenshtein counts them as two.
//! It counts characters, not bytes, so a non-ASCII name is not penalised for its encoding.

/// The number of single-character edits (insert, delete, substitute, swap two neighbours)
/// that turn `a` into `b`. Case matters: `Cache` is one edit from `cache`.
///
/// ```
/// use chia_core::names::edit_distance;
/// assert_eq!(edit_distance("tag", "tags"), 1);
/// assert_eq!(edit_distance("tgas", "tags"), 1);
/// assert_eq!(edit_distance("bypas", "bypass"), 1);
/// assert_eq!(edit_distance("cache", "bypass"), 6);
/// ```
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Three rows of the classic table are enough: a swap looks two rows back.
    let mut before_previous: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let substitution = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (previous[j] + 1).min(current[j - 1] + 1).min(previous[j - 1] + substitution);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(before_previous[j - 2] + 1);
            }
            current[j] = best;
        }
        std::mem::swap(&mut before_previous, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// The known name closest to `name`, if one is within `max_distance` edits and is not `name`
/// itself. Ties go to the earliest in `known`, so callers list their names in the order they
/// would rather suggest.
///
/// ```
/// use chia_core::names::closest_name;
/// assert_eq!(closest_name("tag", ["cache", "tags"], 2), Some("tags"));
/// assert_eq!(closest_name("tags", ["cache", "tags"], 2), None); // not a typo
/// assert_eq!(closest_name("priority", ["cache", "tags"], 2), None);
/// ```
pub fn closest_name<'a>(
    name: &str,
    known: impl IntoIterator<Item = &'a str>,
    max_distance: usize,
) -> Option<&'a str> {
    let mut closest: Option<(usize, &'a str)> = None;
    for candidate in known {
        let distance = edit_distance(name, candidate);
        let closer = closest.is_none_or(|(best, _)| distance < best);
        if distance > 0 && distance <= max_distance && closer {
            closest = Some((distance, candidate));
        }
    }
    closest.map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_counts_each_kind_of_edit_once() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("", "tags"), 4);
        assert_eq!(edit_distance("tags", ""), 4);
        assert_eq!(edit_distance("tags", "tags"), 0);
        assert_eq!(edit_distance("tag", "tags"), 1, "insertion");
        assert_eq!(edit_distance("tagss", "tags"), 1, "deletion");
        assert_eq!(edit_distance("tegs", "tags"), 1, "substitution");
        assert_eq!(edit_distance("tasg", "tags"), 1, "adjacent swap");
        assert_eq!(edit_distance("Cache", "cache"), 1, "case matters");
        assert_eq!(edit_distance("bypas", "bypass"), 1);
        assert_eq!(edit_distance("bpyas", "bypass"), 2, "a swap and a deletion");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn distance_is_symmetric_and_counts_characters_not_bytes() {
        for (a, b) in [("tag", "tags"), ("tasg", "tags"), ("data", "cache"), ("bypas", "bypass")] {
            assert_eq!(edit_distance(a, b), edit_distance(b, a), "{a} / {b}");
        }
        assert_eq!(edit_distance("caché", "cache"), 1);
        assert_eq!(edit_distance("données", "donnees"), 1);
    }

    #[test]
    fn the_closest_name_within_reach_is_suggested() {
        let fields = ["bypass", "tags", "data"];
        assert_eq!(closest_name("tag", fields, 2), Some("tags"));
        assert_eq!(closest_name("dat", fields, 2), Some("data"));
        assert_eq!(closest_name("bypas", fields, 2), Some("bypass"));
        assert_eq!(closest_name("Tags", fields, 2), Some("tags"));
        // Too far from everything, or exactly a known name: nothing to suggest.
        assert_eq!(closest_name("priority", fields, 2), None);
        assert_eq!(closest_name("data", fields, 2), None);
        assert_eq!(closest_name("bpyas", ["bypass"], 1), None);
        assert_eq!(closest_name("bpyas", ["bypass"], 2), Some("bypass"));
    }

    #[test]
    fn the_nearer_name_wins_and_ties_go_to_the_first_listed() {
        assert_eq!(closest_name("cachs", ["caches", "cache"], 2), Some("caches"), "both one edit away");
        assert_eq!(closest_name("cachs", ["cache", "caches"], 2), Some("cache"), "both one edit away");
        assert_eq!(closest_name("tagz", ["tabs", "tags"], 2), Some("tags"), "one edit beats two");
        assert_eq!(closest_name("tagz", ["tags", "tabs"], 2), Some("tags"), "one edit beats two");
    }
}
