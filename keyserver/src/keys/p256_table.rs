//! ECDSA P-256 over a prehashed digest, with a precomputed table of the base point.
//!
//! The `p256` crate computes the nonce point k×G with a generic scalar multiplication
//! (256 doublings and a table built per call: "TODO precomputed basepoint tables" in
//! `primeorder`), which was 70% of the key server's time per signature. Here k×G is
//! the sum of one entry per 6-bit window of k, from a table of j·64^i·G built once. k is
//! recoded with signed digits (-32..=31: a window's value over 31 becomes that minus 64,
//! and one is carried into the next window), so a window needs only the entries 1..=32,
//! negated for a negative digit: 43 windows × 32 entries, 43 mixed additions and no
//! doubling. Against unsigned 4-bit windows (64 additions over 16 entries) that is 13%
//! less time per signature; signed 5-bit windows (52 additions over 16 entries) gave 10%
//! less, 7-bit ones (37 additions, but 64 entries to scan) 10% less too.
//!
//! Everything else is the `ecdsa` crate's `sign_prehashed`, step by step, with the same
//! field and group arithmetic (`p256`'s constant-time code) and the same RFC 6979 nonce,
//! so the signature is byte for byte the one `p256::ecdsa::SigningKey::sign_prehash`
//! makes (a test checks it). Constant time: the recoding is arithmetic without a branch,
//! each table entry is chosen by scanning all 32 of its window with `conditional_assign`
//! and negated with `conditional_negate`, and the complete addition formulas handle the
//! identity (a zero digit) without a branch.
//!
//! One step differs in how, not in what: the nonce's inverse k⁻¹. `p256`'s constant-time
//! `Scalar::invert` is a square-and-multiply chain of ~450 multiplications (about as
//! long as the table's k×G); the variable-time binary GCD (`Invert::invert_vartime`,
//! Stein's algorithm) takes a quarter of that, but its time depends on its input, and
//! timing that leaks bits of k leaks the key (lattice attacks on ECDSA need only a few
//! bits of many nonces). So it never sees k: with b a uniformly random nonzero scalar
//! drawn from the OS for each signature, it inverts k·b, and k⁻¹ = (k·b)⁻¹·b. For any
//! nonzero k, k·b is uniform over the nonzero scalars and independent of k (multiplying
//! by k permutes them), so the inversion's timing tells nothing of k; b itself only
//! enters constant-time multiplications. The result is the same k⁻¹, so the signature is
//! unchanged (and stays deterministic, RFC 6979's).
//!
//! Not done: the field inversion of `to_affine` (r's x-coordinate) could be blinded the
//! same way, but `p256` offers no variable-time field inversion and keeps the projective
//! coordinates private.

use std::sync::OnceLock;

use p256::ecdsa::{DerSignature, Signature};
use p256::elliptic_curve::ops::{Invert as _, Reduce};
use p256::elliptic_curve::point::{AffineCoordinates as _, Double as _};
use p256::elliptic_curve::rand_core::OsRng;
use p256::elliptic_curve::subtle::{
    Choice, ConditionallyNegatable as _, ConditionallySelectable as _, ConstantTimeEq as _,
};
use p256::elliptic_curve::{Curve as _, Field as _, FieldBytesEncoding as _, PrimeField as _};
use p256::{AffinePoint, FieldBytes, NistP256, NonZeroScalar, ProjectivePoint, Scalar, U256};

/// Bits per window.
const W: usize = 6;

/// Windows of a 256-bit scalar: 43 × 6 = 258 bits. The top window holds bits 252..=255
/// and the carry from below, at most 16: it carries nothing further.
const WINDOWS: usize = 43;

/// Entries per window: the digits' magnitudes 1..=32.
const ENTRIES: usize = 1 << (W - 1);

type Table = [[AffinePoint; ENTRIES]; WINDOWS];

/// `table[i][j]` = (j+1)·64^i·G, built once per process (1,376 points, ~100 KiB).
fn table() -> &'static Table {
    static TABLE: OnceLock<Box<Table>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t: Box<Table> = vec![[AffinePoint::IDENTITY; ENTRIES]; WINDOWS]
            .into_boxed_slice()
            .try_into()
            .unwrap_or_else(|_| unreachable!("WINDOWS rows"));
        let mut base = ProjectivePoint::GENERATOR;
        for row in t.iter_mut() {
            let mut p = ProjectivePoint::IDENTITY;
            for entry in row.iter_mut() {
                p += base;
                *entry = p.to_affine();
            }
            for _ in 0..W {
                base = base.double();
            }
        }
        t
    })
}

/// Builds the table now rather than on the first signature.
pub fn warm_up() {
    table();
}

/// k in radix 64 with digits in -32..=31: k = Σ digits[i]·64^i. A window's value (its
/// bits plus the carry from below) over 31 becomes that minus 64 and carries one into
/// the next; no branch on k.
fn signed_digits(k: &Scalar) -> [i8; WINDOWS] {
    let be = k.to_repr();
    // Little-endian, with a zero byte past the top for the last window's two-byte read.
    let mut le = [0u8; 33];
    for (l, b) in le.iter_mut().zip(be.iter().rev()) {
        *l = *b;
    }
    let mut digits = [0i8; WINDOWS];
    let mut carry = 0u16;
    for (i, d) in digits.iter_mut().enumerate() {
        let bit = i * W;
        let two = u16::from(le[bit / 8]) | (u16::from(le[bit / 8 + 1]) << 8);
        let v = ((two >> (bit % 8)) & ((1 << W) - 1)) + carry; // 0..=64
        carry = (v + ENTRIES as u16) >> W; // 1 for v >= 32
        *d = (v as i16 - (carry << W) as i16) as i8; // -32..=31
    }
    debug_assert_eq!(carry, 0, "the top window carries nothing");
    digits
}

/// k×G, in constant time.
fn mul_base(k: &Scalar) -> ProjectivePoint {
    let mut acc = ProjectivePoint::IDENTITY;
    for (row, d) in table().iter().zip(signed_digits(k)) {
        // |d| and its sign without a branch: `neg` is all ones for a negative digit.
        let neg = d >> 7;
        let abs = ((d ^ neg) - neg) as u8;
        let mut entry = AffinePoint::IDENTITY;
        for (j, p) in (1u8..).zip(row.iter()) {
            entry.conditional_assign(p, j.ct_eq(&abs));
        }
        entry.conditional_negate(Choice::from((neg & 1) as u8));
        acc += entry;
    }
    acc
}

/// The digest as a field element's bytes (SEC1 `bits2int`, FIPS 186-5): its leftmost
/// 256 bits, or a shorter one left-padded. At least 128 bits, as `ecdsa` requires.
fn bits2field(prehash: &[u8]) -> Option<FieldBytes> {
    if prehash.len() < 16 {
        return None;
    }
    let mut z = FieldBytes::default();
    let n = prehash.len().min(32);
    z[32 - n..].copy_from_slice(&prehash[..n]);
    Some(z)
}

/// Signs `prehash` with `d`: the DER signature TLS carries. `None` only for a digest
/// shorter than 128 bits (or, with negligible probability, a zero r or s).
pub fn sign_prehash(d: &NonZeroScalar, prehash: &[u8]) -> Option<DerSignature> {
    let z = bits2field(prehash)?;
    // The RFC 6979 nonce, as `ecdsa::hazmat::SignPrimitive::try_sign_prehashed_rfc6979`
    // derives it (no additional data).
    let k = Scalar::from_repr(rfc6979::generate_k::<sha2::Sha256, _>(
        &d.to_repr(),
        &NistP256::ORDER.encode_field_bytes(),
        &z,
        &[],
    ));
    let k: Scalar = Option::from(k)?;
    if bool::from(k.is_zero()) {
        return None;
    }
    let z = <Scalar as Reduce<U256>>::reduce_bytes(&z);
    // The blinded variable-time inversion of the module's docs: (k·b)⁻¹·b = k⁻¹.
    let b = NonZeroScalar::random(&mut OsRng);
    let kb_inv: Scalar = Option::from((k * b.as_ref()).invert_vartime())?;
    let k_inv = kb_inv * b.as_ref();
    let r_point = mul_base(&k).to_affine();
    let r = <Scalar as Reduce<U256>>::reduce_bytes(&r_point.x());
    let s = k_inv * (z + r * d.as_ref());
    // `from_scalars` refuses a zero r or s.
    Signature::from_scalars(r, s).ok().map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_multiplies_as_the_generic_code_at_the_recodings_edges() {
        let minus_one = -Scalar::ONE;
        let mut ks: Vec<Scalar> = [1u64, 2, 31, 32, 33, 63, 64, 65, 0x7fff_ffff, u64::MAX]
            .into_iter()
            .map(Scalar::from)
            .collect();
        // n-1 and its neighbours; every 6-bit window 31 (just under the borrow), 32 (just
        // over) or 63 (a carry rippling through all); the top bit alone.
        ks.extend([minus_one, minus_one - Scalar::ONE, -Scalar::from(64u64)]);
        for v in [31u64, 32, 63] {
            let mut k = Scalar::ZERO;
            for _ in 0..WINDOWS - 1 {
                k = k * Scalar::from(64u64) + Scalar::from(v);
            }
            ks.push(k);
        }
        let mut top = FieldBytes::default();
        top[0] = 0x80;
        ks.extend(Option::<Scalar>::from(Scalar::from_repr(top)));
        ks.extend((0..32).map(|_| *NonZeroScalar::random(&mut OsRng)));
        for k in ks {
            assert_eq!(
                mul_base(&k).to_affine(),
                (ProjectivePoint::GENERATOR * k).to_affine(),
                "k = {k:?}"
            );
        }
    }
}
