//! Argon2id password hashes as PHC strings, computed in working memory that
//! is kept and reused: the argon2 crate's own `hash_password` allocates the
//! whole cost (19 MiB here) per hash, and glibc's malloc kept those blocks in
//! one arena per blocking thread — 50 concurrent logins left about 740 MB
//! resident. The hashing itself is the crate's (`hash_password_into_with_memory`),
//! and so is the constant-time comparison of [`Output`].

use std::sync::Mutex;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand_core::OsRng;

/// Most working memories kept for reuse (more than the hub's login slots).
const MAX_SPARE: usize = 4;

/// Largest memory cost a stored hash may ask for (KiB): a hash that asks for
/// more is taken as not matching rather than allocated.
pub(crate) const MAX_MEMORY_KIB: u32 = 256 * 1024;

/// Hashes and verifies passwords with argon2id and `params`.
pub struct Hasher {
    params: Params,
    spare: Mutex<Vec<Vec<Block>>>,
}

impl Hasher {
    /// A hasher for new hashes with `params` (verification follows each
    /// stored hash's own parameters).
    pub fn new(params: Params) -> Self {
        Hasher {
            params,
            spare: Mutex::new(Vec::new()),
        }
    }

    /// The PHC string of `password` under a fresh random salt.
    pub fn hash(&self, password: &[u8]) -> argon2::password_hash::Result<String> {
        let salt = SaltString::generate(&mut OsRng);
        let mut buf = [0u8; 64];
        let salt_bytes = salt.as_salt().decode_b64(&mut buf)?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone());
        let len = self
            .params
            .output_len()
            .unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let output = Output::init_with(len, |out| {
            self.compute(&argon, &self.params, password, salt_bytes, out)
        })?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&self.params)?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        };
        Ok(phc.to_string())
    }

    /// True when `password` matches `phc`, hashed with the algorithm, version
    /// and parameters it names, and compared in constant time.
    pub fn verify(&self, password: &[u8], phc: &PasswordHash<'_>) -> bool {
        let (Some(salt), Some(expected)) = (&phc.salt, &phc.hash) else {
            return false;
        };
        let Ok(algorithm) = Algorithm::try_from(phc.algorithm) else {
            return false;
        };
        let Ok(version) = phc.version.map(Version::try_from).transpose() else {
            return false;
        };
        let Ok(params) = Params::try_from(phc) else {
            return false;
        };
        if params.m_cost() > MAX_MEMORY_KIB {
            return false;
        }
        let mut buf = [0u8; 64];
        let Ok(salt_bytes) = salt.decode_b64(&mut buf) else {
            return false;
        };
        let argon = Argon2::new(algorithm, version.unwrap_or_default(), params.clone());
        Output::init_with(expected.len(), |out| {
            self.compute(&argon, &params, password, salt_bytes, out)
        })
        .is_ok_and(|computed| computed == *expected)
    }

    /// Runs `argon` in a kept working memory (or a new one), then keeps it.
    fn compute(
        &self,
        argon: &Argon2<'_>,
        params: &Params,
        password: &[u8],
        salt: &[u8],
        out: &mut [u8],
    ) -> argon2::password_hash::Result<()> {
        let need = params.block_count();
        let mut memory = self.take(need);
        let result = argon.hash_password_into_with_memory(password, salt, out, &mut memory[..need]);
        self.keep(memory);
        Ok(result?)
    }

    fn take(&self, need: usize) -> Vec<Block> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        match spare.iter().position(|m| m.len() >= need) {
            Some(i) => spare.swap_remove(i),
            None => vec![Block::default(); need],
        }
    }

    fn keep(&self, memory: Vec<Block>) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < MAX_SPARE {
            spare.push(memory);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    fn small() -> Params {
        Params::new(64, 1, 1, None).unwrap()
    }

    #[test]
    fn hashes_verify_both_ways_with_the_crate_and_memory_is_reused() {
        let h = Hasher::new(small());
        let phc = h.hash(b"correct horse").unwrap();
        let parsed = PasswordHash::new(&phc).unwrap();
        assert!(h.verify(b"correct horse", &parsed));
        assert!(!h.verify(b"correct horsE", &parsed));
        // The crate's own verifier accepts ours, and ours accepts the crate's.
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, small());
        assert!(argon.verify_password(b"correct horse", &parsed).is_ok());
        let salt = SaltString::generate(&mut OsRng);
        let theirs = argon.hash_password(b"battery", &salt).unwrap().to_string();
        assert!(h.verify(b"battery", &PasswordHash::new(&theirs).unwrap()));
        assert!(!h.verify(b"staple", &PasswordHash::new(&theirs).unwrap()));
        assert!(
            !h.spare.lock().unwrap().is_empty(),
            "kept for the next hash"
        );
        assert!(h.spare.lock().unwrap().len() <= MAX_SPARE);
    }

    #[test]
    fn other_parameters_and_bad_hashes_are_followed_or_refused() {
        let h = Hasher::new(small());
        // A hash made with more memory and passes verifies with its own.
        let other = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(128, 2, 1, None).unwrap(),
        );
        let salt = SaltString::generate(&mut OsRng);
        let phc = other.hash_password(b"pw", &salt).unwrap().to_string();
        assert!(h.verify(b"pw", &PasswordHash::new(&phc).unwrap()));
        // A stored hash asking for more memory than allowed is not run.
        let huge = phc.replace("m=128", "m=4194304");
        assert!(!h.verify(b"pw", &PasswordHash::new(&huge).unwrap()));
        // Another algorithm's hash, or none, does not match.
        let no_hash = PasswordHash::new("$argon2id$v=19$m=64,t=1,p=1$c29tZXNhbHQ").unwrap();
        assert!(!h.verify(b"pw", &no_hash));
        let scrypt = phc.replace("$argon2id$", "$scrypt$");
        let unknown = PasswordHash::new(&scrypt).unwrap();
        assert!(!h.verify(b"pw", &unknown));
    }
}
