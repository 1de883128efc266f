"""Which bundles may load native code: the caller's opt-in, or an ed25519 signature by a trusted key.

Torch-free (``cryptography`` only). A bundle is input: people download it, copy it between machines and
hand it to an app. Its ONNX graphs are data that ONNX Runtime interprets, but a TVM bundle (targets
``cpu-tvm``, ``arm64``) carries a shared library, and loading a shared library runs its code (its
constructors run inside ``dlopen``, before TVM looks at it). The sha256 sums in ``manifest.json`` prove
that the files are the ones the manifest lists, not who wrote the manifest. So the runtime loads native
code only from a bundle that is trusted:

- by the caller: ``Engine.load(path, trust=True)`` or ``--trust`` on the command line ("I know where
  this bundle came from"); or
- by signature: ``manifest.sig`` holds an ed25519 signature of the exact bytes of ``manifest.json`` (which
  lists every file with its sha256) by a key in the trusted list: ``--trusted-key PUB``, ``TrustPolicy(keys=
  ...)``, or the ``EDGEDEC_TRUSTED_KEYS`` environment variable (key files or directories of them,
  separated by ``os.pathsep``). A CI pipeline signs what it builds (``edgedec sign``); an app lists the
  pipeline's public key and refuses everything else.

The check runs before the library is opened, and with a signature it hashes the library against the
signed manifest even when the caller skipped hash checks. A draft bundle nested in a signed bundle (its
``manifest.json`` among the parent's hashed files) is covered by the parent's signature.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError, ConfigError, UntrustedBundleError

SIGNATURE = "manifest.sig"
SIGNATURE_FORMAT = "edgedec-signature"
log = logging.getLogger(__name__)
TRUSTED_KEYS_ENV = "EDGEDEC_TRUSTED_KEYS"
# The local key: ``edgedec compile`` signs every bundle with native code it builds with a key of this user's
# (made on first use, mode 0600), and the loader trusts that key's signatures by default. So a bundle you
# compiled yourself loads without --trust, while one from elsewhere (not signed by your key) does not.
LOCAL_KEY_ENV = "EDGEDEC_LOCAL_KEY"  # path of the local private key; "off" disables signing and trusting it
LOCAL_KEY_NAME = "local-signing-key"
DOMAIN = b"edgedec-bundle-manifest-v1\0"  # signed before the manifest's bytes: a signature means nothing elsewhere
NATIVE_FORMATS = ("tvm-relax-vm",)  # graph formats whose file is a shared library the runtime dlopens
KEY_SUFFIXES = (".pub", ".pem")
MAX_SIGNATURE_BYTES = 1 << 20  # a signature entry is ~250 bytes  # the files a trusted-keys directory contributes


def key_id(public: bytes) -> str:
    """A short, stable name of a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(public).hexdigest()[:16]


# -- keys ------------------------------------------------------------------------------------------------
def _public_keys_from_text(text: str, where: str) -> list[bytes]:
    """The raw ed25519 public keys in ``text``: PEM ``PUBLIC KEY`` blocks and/or ``ssh-ed25519`` lines."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    keys, block = [], None
    for line in text.splitlines():
        line = line.strip()
        if line == "-----BEGIN PUBLIC KEY-----":
            block = [line]
        elif block is not None:
            block.append(line)
            if line == "-----END PUBLIC KEY-----":
                try:
                    key = serialization.load_pem_public_key("\n".join(block).encode())
                except ValueError as exc:
                    raise ConfigError(f"{where}: a PEM public key that cannot be read ({exc})") from exc
                if not isinstance(key, Ed25519PublicKey):
                    raise ConfigError(f"{where}: a public key that is not ed25519")
                keys.append(key.public_bytes(*raw))
                block = None
        elif line.startswith("ssh-ed25519 "):
            try:
                key = serialization.load_ssh_public_key(line.encode())
            except ValueError as exc:
                raise ConfigError(f"{where}: an ssh-ed25519 line that cannot be read ({exc})") from exc
            keys.append(key.public_bytes(*raw))
    if not keys:
        raise ConfigError(f"{where} holds no ed25519 public key (PEM 'PUBLIC KEY' or 'ssh-ed25519' line)")
    return keys


def load_public_keys(path: str | Path) -> list[bytes]:
    """The raw ed25519 public keys in a key file, or in the ``.pub``/``.pem`` files of a directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in KEY_SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"trusted-keys directory {path} has no {'/'.join(KEY_SUFFIXES)} files")
        return [k for f in files for k in load_public_keys(f)]
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"public key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read public key file {path}: {exc}") from exc
    return _public_keys_from_text(text, str(path))


def load_private_key(path: str | Path):
    """An ed25519 private key from a PEM (PKCS#8, unencrypted) or OpenSSH private key file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"private key file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read private key file {path}: {exc}") from exc
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: encrypted without a password
        raise ConfigError(f"{path} is not an unencrypted ed25519 private key (PEM or OpenSSH): {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an ed25519 private key")
    return key


def generate_key_pair(private_path: str | Path, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new ed25519 key pair: ``private_path`` (PEM PKCS#8, mode 0600) and ``private_path.pub``
    (PEM public key, the file to hand to whoever verifies). Returns both paths and the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if os.path.lexists(p) and not force:
            raise ConfigError(f"{p} already exists; pass --force to replace it")
        if p.is_dir():
            raise ConfigError(f"{p} is a directory")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    write_atomic(private_path, private, mode=0o600)
    write_atomic(public_path, public, mode=0o644)
    return private_path, public_path, key_id(raw)


def local_key_path(env: dict | None = None) -> Path | None:
    """This user's local signing key: ``$EDGEDEC_LOCAL_KEY``, else ``$XDG_CONFIG_HOME/edgedec/local-signing-key``
    (``~/.config/edgedec/...``); None when ``EDGEDEC_LOCAL_KEY=off``."""
    env = os.environ if env is None else env
    given = env.get(LOCAL_KEY_ENV)
    if given is not None:
        return None if given.strip().lower() in ("off", "0", "") else Path(given).expanduser()
    base = env.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "edgedec" / LOCAL_KEY_NAME


def local_public_key(env: dict | None = None) -> bytes | None:
    """The local key's raw public key if the key exists (it is never made here), else None."""
    path = local_key_path(env)
    public = path.with_name(path.name + ".pub") if path is not None else None
    if public is None or not public.is_file() or not path.is_file():
        return None
    try:
        keys = load_public_keys(public)
    except ConfigError:
        log.warning("the local signing key's public half %s is unreadable; not trusting it", public)
        return None
    return keys[0] if keys else None


def sign_with_local_key(bundle_path: str | Path) -> str | None:
    """Sign a bundle this machine just built with the local key (made on first use); returns the key id, or
    None when local signing is off."""
    path = local_key_path()
    if path is None:
        return None
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            generate_key_pair(path)
        except ConfigError:  # made meanwhile by a concurrent compile
            pass
        log.info("made the local signing key %s (bundles this user compiles are signed with it)", path)
    return sign_bundle(bundle_path, path)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileNotFoundError:
        raise ConfigError(f"cannot write {path}: its directory does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- policy ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrustPolicy:
    """What makes a bundle with native code trusted.

    trust_all: the caller trusts the bundle being loaded, whoever made it (``--trust``).
    keys: raw ed25519 public keys (32 bytes each); a bundle whose ``manifest.sig`` verifies with one is trusted.
    vouched: sha256 hex digests of manifests that a trusted, signed bundle lists among its hashed files (its
      nested draft bundle): such a manifest is covered by that signature.
    """

    trust_all: bool = False
    keys: tuple[bytes, ...] = ()
    vouched: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, trust_all: bool = False, key_files=(), env: dict | None = None) -> "TrustPolicy":
        """``key_files`` (paths of key files or directories) plus those ``EDGEDEC_TRUSTED_KEYS`` names."""
        env = os.environ if env is None else env
        sources = [Path(p) for p in key_files]
        sources += [Path(p) for p in env.get(TRUSTED_KEYS_ENV, "").split(os.pathsep) if p]
        keys = []
        if (local := local_public_key(env if env is not os.environ else None)) is not None:
            keys.append(local)  # bundles this user compiled (signed at compile time)
        for source in sources:
            for key in load_public_keys(source):
                if key not in keys:
                    keys.append(key)
        return cls(trust_all, tuple(keys))

    def to_dict(self) -> dict:
        """A JSON-able form (what the benchmark worker process receives)."""
        return {"trust_all": self.trust_all, "keys": [k.hex() for k in self.keys], "vouched": list(self.vouched)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrustPolicy":
        return cls(bool(d.get("trust_all")), tuple(bytes.fromhex(k) for k in d.get("keys", ())),
                   tuple(d.get("vouched", ())))


def as_policy(trust: "bool | TrustPolicy | None") -> TrustPolicy:
    """``Engine.load``'s ``trust`` argument as a policy: a :class:`TrustPolicy` as given; ``True`` trusts
    the bundle; ``False``/``None`` trust only signatures by the keys ``EDGEDEC_TRUSTED_KEYS`` names."""
    if isinstance(trust, TrustPolicy):
        return trust
    if trust is True:  # no keys needed (nor read)
        return TrustPolicy(trust_all=True)
    if trust is None or trust is False:
        return TrustPolicy.from_env()
    raise ConfigError(f"trust must be True, False or a TrustPolicy, got {type(trust).__name__}")


@dataclass(frozen=True)
class TrustDecision:
    trusted: bool
    reason: str  # why: "no native code", "trusted by the caller", "signed by trusted key 1a2b..."
    signed_by: str | None = None  # the key id whose signature verified, if any


def native_code(bundle) -> list[str]:
    """The bundle files the runtime would load as native code (shared libraries it dlopens)."""
    names = []
    for graph in bundle.manifest["graphs"].values():
        if isinstance(graph, dict) and (graph.get("format") in NATIVE_FORMATS
                                        or bundle.manifest["target"].get("backend") == "tvm"):
            names.append(graph.get("file"))
    return names


# -- signatures ------------------------------------------------------------------------------------------
def _read_signatures(bundle_path: Path) -> list[dict] | None:
    """The entries of ``manifest.sig`` (None when there is none). A malformed file is a BundleError."""
    from .bundle import resolve_inside

    path = Path(bundle_path) / SIGNATURE
    if not os.path.lexists(path):
        return None
    real = resolve_inside(bundle_path, SIGNATURE)
    try:
        if real.stat().st_size > MAX_SIGNATURE_BYTES:
            raise BundleError(f"{SIGNATURE} is larger than {MAX_SIGNATURE_BYTES:,} bytes; not a signature file")
        doc = json.loads(real.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{SIGNATURE} is not a readable signature file ({type(exc).__name__})") from exc
    sigs = doc.get("signatures") if isinstance(doc, dict) and doc.get("format") == SIGNATURE_FORMAT else None
    if not isinstance(sigs, list) or not all(isinstance(s, dict) for s in sigs):
        raise BundleError(f"{SIGNATURE} is not an edgedec signature file")
    return sigs


def _verifies(public: bytes, entry: dict, manifest_bytes: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if entry.get("algorithm") != "ed25519" or not isinstance(entry.get("signature"), str):
        return False
    try:
        signature = base64.b64decode(entry["signature"], validate=True)
        Ed25519PublicKey.from_public_bytes(public).verify(signature, DOMAIN + manifest_bytes)
        return True
    except (InvalidSignature, ValueError, binascii.Error):
        return False


def signed_by(bundle, keys) -> tuple[str | None, str]:
    """The id of the first key in ``keys`` whose signature in ``manifest.sig`` verifies over the bundle's
    manifest bytes (None if none), and a few words on why not (for the refusal)."""
    sigs = _read_signatures(bundle.path)
    if sigs is None:
        return None, f"no {SIGNATURE}"
    for public in keys:
        for entry in sigs:
            if entry.get("key_id") in (None, key_id(public)) and _verifies(public, entry, bundle.raw):
                return key_id(public), ""
    known = {key_id(k) for k in keys}
    if any(e.get("key_id") in known for e in sigs):
        return None, f"{SIGNATURE}'s signature by a trusted key does not match manifest.json (modified after signing)"
    ids = ", ".join(str(e.get("key_id"))[:16] for e in sigs) or "none"
    return None, f"{SIGNATURE} is signed by key {ids}, not by a trusted key"


def sign_bundle(path: str | Path, private_key_path: str | Path) -> str:
    """Check the bundle (every file against its sha256), sign ``manifest.json``'s bytes and write
    ``manifest.sig`` atomically (a signature by the same key is replaced, others kept). Returns the key id."""
    from cryptography.hazmat.primitives import serialization

    from .bundle import Bundle

    key = load_private_key(private_key_path)
    bundle = Bundle.open(path, verify_hashes=True)  # sign only what is intact
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kid = key_id(public)
    entry = {"algorithm": "ed25519", "key_id": kid,
             "manifest_sha256": hashlib.sha256(bundle.raw).hexdigest(),
             "signature": base64.b64encode(key.sign(DOMAIN + bundle.raw)).decode()}
    try:
        old = _read_signatures(bundle.path) or []
    except BundleError:
        old = []  # an unreadable signature file is replaced
    sigs = [e for e in old if e.get("key_id") != kid and _still_valid(e, bundle.raw)] + [entry]
    doc = {"format": SIGNATURE_FORMAT, "version": 1, "signatures": sigs}
    write_atomic(Path(bundle.path) / SIGNATURE, (json.dumps(doc, indent=2) + "\n").encode())
    return kid


def _still_valid(entry: dict, manifest_bytes: bytes) -> bool:
    """Whether another signer's entry is over these manifest bytes (a stale one is dropped)."""
    return entry.get("manifest_sha256") == hashlib.sha256(manifest_bytes).hexdigest()


@dataclass(frozen=True)
class Verification:
    ok: bool
    reason: str  # what verified, or what failed
    key_id: str | None = None


def verify_bundle(path: str | Path, keys) -> Verification:
    """Whether ``manifest.sig`` holds a signature by one of ``keys`` over ``manifest.json`` and every file
    matches the manifest. A directory that is not a bundle raises (BundleError); a failed check returns
    ``ok=False`` with the reason."""
    from .bundle import Bundle

    keys = list(keys)
    if not keys:
        raise ConfigError(f"no public key to verify with: pass --pubkey PUB or set {TRUSTED_KEYS_ENV}")
    bundle = Bundle.open(path, verify_hashes=False)  # structure first: a wrong directory is bad input
    kid, why = signed_by(bundle, keys)
    if kid is None:
        return Verification(False, f"{bundle.path}: {why}")
    try:
        bundle._check_files(verify_hashes=True)
    except BundleError as exc:
        return Verification(False, f"the signature by key {kid} is valid, but {exc}", kid)
    return Verification(True, f"signed by key {kid}; every file matches the signed manifest", kid)


# -- the check before native code loads ------------------------------------------------------------------
def check_native(bundle, trust: "bool | TrustPolicy | None" = None) -> TrustDecision:
    """Decide whether ``bundle`` may load its native code; raise :class:`UntrustedBundleError` if not.

    Runs before anything is dlopened. With a signature, the libraries are hashed against the signed
    manifest here (also when the bundle was opened without hash checks). The decision is cached on the
    bundle object for the same policy."""
    cached = getattr(bundle, "_trust_decision", None)
    names = native_code(bundle)
    if not names:
        return TrustDecision(True, "no native code")
    policy = as_policy(trust)
    if cached is not None and cached[0] == policy:
        return cached[1]
    if policy.trust_all:
        decision = TrustDecision(True, "trusted by the caller (--trust / trust=True)")
    elif hashlib.sha256(bundle.raw).hexdigest() in policy.vouched:
        _check_native_hashes(bundle, names)
        decision = TrustDecision(True, "covered by the signature of the bundle it is nested in")
    else:
        kid, why = signed_by(bundle, policy.keys) if policy.keys else (None, "no trusted keys are configured")
        if kid is None:
            libs = ", ".join(str(n) for n in names)
            raise UntrustedBundleError(
                f"{bundle.path} carries native code ({libs}, a compiled library that runs with your privileges "
                f"when loaded) and is not trusted ({why}): pass --trust (Engine.load(..., trust=True)) if you "
                f"trust where it came from, or trust its signer's public key with --trusted-key PUB or "
                f"{TRUSTED_KEYS_ENV}")
        _check_native_hashes(bundle, names)
        decision = TrustDecision(True, f"signed by trusted key {kid}", kid)
    bundle._trust_decision = (policy, decision)
    return decision


def _check_native_hashes(bundle, names) -> None:
    from .bundle import sha256_file

    for name in names:
        info = bundle.manifest["files"].get(name) if isinstance(name, str) else None
        if not isinstance(info, dict) or sha256_file(bundle.file(name)) != info.get("sha256"):
            raise UntrustedBundleError(f"bundle file {name} does not match its sha256 in the signed manifest "
                                       "(modified after signing)")


def vouch_for_nested(bundle, policy: TrustPolicy, rel: str) -> TrustPolicy:
    """The policy a draft bundle nested at ``rel`` inside ``bundle`` loads with: the parent's, plus, when
    the parent is signed by a trusted key, the nested manifest's hash as the parent lists it (so the
    parent's signature covers the draft; its files are covered by its own manifest's hashes)."""
    entry = bundle.manifest["files"].get(f"{rel.rstrip('/')}/manifest.json")
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise BundleError(f"the draft bundle {rel} is not among the bundle's hashed files")
    if policy.keys and not policy.trust_all:
        kid, _ = signed_by(bundle, policy.keys)
        if kid is not None:
            return TrustPolicy(policy.trust_all, policy.keys, (*policy.vouched, entry["sha256"]))
    return policy
