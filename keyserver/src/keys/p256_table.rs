//! ECDSA P-256 over a prehashed digest, with a precomputed table of the base point.
//!
//! The `p256` crate computes the nonce point k×G with a generic scalar multiplication
//! (256 doublings and a table built per call: "TODO precomputed basepoint tables" in
//! `primeorder`), which was 70% of the key server's time per signature. Here k×G is
//! the sum of one entry per 4-bit window of k from a table of j·16^i·G (64 windows × 16
//! entries, built once): 64 mixed additions and no doubling.
//!
//! Everything else is the `ecdsa` crate's `sign_prehashed`, step by step, with the same
//! field and group arithmetic (`p256`'s constant-time code) and the same RFC 6979 nonce,
//! so the signature is byte for byte the one `p256::ecdsa::SigningKey::sign_prehash`
//! makes (a test checks it). Constant time: each table entry is chosen by scanning all 16
//! of its window with `conditional_assign`, and the complete addition formulas handle the
//! identity without a branch.
//!
//! One step differs in how, not in what: the nonce's inverse k⁻¹. `p256`'s constant-time
//! `Scalar::invert` is a square-and-multiply chain of ~450 multiplications (about as long as
//! the table's k×G); the variable-time binary GCD (`Invert::invert_vartime`, Stein's
//! algorithm) takes a quarter of that, but its time depends on its input, and timing
//! that leaks bits of k leaks the key (lattice attacks on ECDSA need only a few bits of
//! many nonces). So it never sees k: with b a uniformly random nonzero scalar drawn from
//! the OS for each signature, it inverts k·b, and k⁻¹ = (k·b)⁻¹·b. For any nonzero k,
//! k·b is uniform over the nonzero scalars and independent of k (multiplying by k is a
//! bijection of the group), so the inversion's timing tells nothing of k; b itself only
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
use p256::elliptic_curve::subtle::{ConditionallySelectable as _, ConstantTimeEq as _};
use p256::elliptic_curve::{Curve as _, Field as _, FieldBytesEncoding as _, PrimeField as _};
use p256::{AffinePoint, FieldBytes, NistP256, NonZeroScalar, ProjectivePoint, Scalar, U256};

/// 4-bit windows in a 256-bit scalar.
const WINDOWS: usize = 64;

type Table = [[AffinePoint; 16]; WINDOWS];

/// `table[i][j]` = j·16^i·G, built once per process (~1,000 points, 70 KiB).
fn table() -> &'static Table {
    static TABLE: OnceLock<Box<Table>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t: Box<Table> = vec![[AffinePoint::IDENTITY; 16]; WINDOWS]
            .into_boxed_slice()
            .try_into()
            .unwrap_or_else(|_| unreachable!("WINDOWS rows"));
        let mut base = ProjectivePoint::GENERATOR;
        for row in t.iter_mut() {
            let mut p = ProjectivePoint::IDENTITY;
            for entry in row.iter_mut().skip(1) {
                p += base;
                *entry = p.to_affine();
            }
            for _ in 0..4 {
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

/// k×G, in constant time.
fn mul_base(k: &Scalar) -> ProjectivePoint {
    let bytes = k.to_repr();
    let mut acc = ProjectivePoint::IDENTITY;
    for (i, row) in table().iter().enumerate() {
        // Window i is bits 4i..4i+4 of the big-endian scalar.
        let byte = bytes[31 - i / 2];
        let digit = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
        let mut entry = AffinePoint::IDENTITY;
        for (j, p) in row.iter().enumerate() {
            entry.conditional_assign(p, (j as u8).ct_eq(&digit));
        }
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
