//! Word-wide bit transforms used to convert between log and report page sizes.

/// Moves the bits at even positions of `x` into the low 32 bits, in order.
#[inline]
fn extract_even(mut x: u64) -> u64 {
    x &= 0x5555_5555_5555_5555;
    x = (x | (x >> 1)) & 0x3333_3333_3333_3333;
    x = (x | (x >> 2)) & 0x0f0f_0f0f_0f0f_0f0f;
    x = (x | (x >> 4)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x >> 8)) & 0x0000_ffff_0000_ffff;
    (x | (x >> 16)) & 0x0000_0000_ffff_ffff
}

/// Moves the low 32 bits of `x` to the even positions, in order.
#[inline]
fn spread_to_even(mut x: u64) -> u64 {
    x &= 0x0000_0000_ffff_ffff;
    x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    x = (x | (x << 2)) & 0x3333_3333_3333_3333;
    (x | (x << 1)) & 0x5555_5555_5555_5555
}

/// ORs each group of `2^k` bits of `x` into one bit: bit `i` of the result is the OR of bits
/// `[i*2^k, (i+1)*2^k)`; the result has `64 >> k` meaningful bits (`k <= 6`).
#[inline]
pub(crate) fn or_groups(mut x: u64, k: u32) -> u64 {
    for _ in 0..k {
        x = extract_even(x | (x >> 1));
    }
    x
}

/// Replicates each of the low `64 >> f` bits of `x` into `2^f` copies (`f <= 5`): bit `i`
/// becomes bits `[i*2^f, (i+1)*2^f)`.
#[inline]
pub(crate) fn replicate_bits(mut x: u64, f: u32) -> u64 {
    if f == 0 {
        return x;
    }
    x &= (1u64 << (64 >> f)) - 1;
    for _ in 0..f {
        x = spread_to_even(x);
    }
    // Each set bit now sits alone at a multiple of 2^f; multiplying by 2^(2^f) - 1 fills its
    // slot without carries into the next one.
    x.wrapping_mul((1u64 << (1u32 << f)).wrapping_sub(1))
}

/// Calls `f(start, end)` for each run of consecutive set bits `[start, end)` of `x`.
#[inline]
pub(crate) fn for_each_run(mut x: u64, mut f: impl FnMut(u32, u32)) {
    let mut base = 0u32;
    while x != 0 {
        let zeros = x.trailing_zeros();
        x >>= zeros;
        base += zeros;
        let ones = x.trailing_ones();
        f(base, base + ones);
        x = if ones == 64 { 0 } else { x >> ones };
        base += ones;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn or_groups_model(x: u64, k: u32) -> u64 {
        let g = 1u32 << k;
        (0..64 / g).fold(0, |acc, i| {
            if (x >> (i * g)) & ((1u128 << g) - 1) as u64 != 0 {
                acc | 1 << i
            } else {
                acc
            }
        })
    }

    fn replicate_model(x: u64, f: u32) -> u64 {
        let g = 1u32 << f;
        (0..64 / g).fold(0u64, |acc, i| {
            if x >> i & 1 == 1 {
                acc | ((((1u128 << g) - 1) as u64) << (i * g))
            } else {
                acc
            }
        })
    }

    proptest! {
        #[test]
        fn transforms_match_models(x in any::<u64>(), k in 0u32..=6, f in 0u32..=5) {
            prop_assert_eq!(or_groups(x, k) & ((1u128 << (64 >> k)) - 1) as u64, or_groups_model(x, k));
            prop_assert_eq!(replicate_bits(x, f), replicate_model(x, f));
            let mut rebuilt = 0u64;
            for_each_run(x, |a, b| rebuilt |= (((1u128 << (b - a)) - 1) as u64) << a);
            prop_assert_eq!(rebuilt, x);
        }
    }
}
