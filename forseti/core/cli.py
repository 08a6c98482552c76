"""`forseti keys`, `forseti seal`, `forseti reseal`, `forseti audit`: commands over the core
contract (keyrings, sealed artifacts, the audit log) that need no server."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from forseti.core.logs import configure_logging

log = logging.getLogger(__name__)


def main_keys(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="forseti keys",
        description=(
            "Manage keyrings. Rotation: `keys rotate` adds a key that seals from now on, "
            "`forseti reseal` moves every artifact to it, `keys retire` drops the old key "
            "once nothing needs it."
        ),
    )
    sub = p.add_subparsers(dest="action", required=True)
    new = sub.add_parser("new", help="write a new keyring with one fresh key (mode 0600)")
    new.add_argument("file", type=Path)
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    rotate = sub.add_parser(
        "rotate", help="add a fresh key: it seals from now on, older keys still open"
    )
    rotate.add_argument("file", type=Path)
    rotate.add_argument("--audit-log", type=Path, metavar="PATH", help="record the rotation")
    retire = sub.add_parser(
        "retire", help="remove an old key; refused while any sealed file still needs it"
    )
    retire.add_argument("file", type=Path)
    retire.add_argument("key_id", metavar="KEYID")
    retire.add_argument(
        "--repository",
        type=Path,
        action="append",
        required=True,
        metavar="DIR",
        help="folder whose sealed files (searched recursively) must not need the key; "
        "repeat for every repository or checkpoint folder the keyring opens",
    )
    retire.add_argument("--audit-log", type=Path, metavar="PATH", help="record the retirement")
    listing = sub.add_parser("list", help="key ids, oldest first (no secrets)")
    listing.add_argument("file", type=Path)
    listing.add_argument(
        "--repository",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="also count the sealed files under DIR that need each key",
    )
    args = p.parse_args(argv)
    configure_logging("WARNING")
    from forseti.core.sealing.keyring import Keyring, KeyringError

    if args.action == "new":
        if args.file.exists() and not args.force:
            print(
                f"forseti keys new: {args.file} exists; it may hold keys that open your "
                "artifacts. Use --force to overwrite it.",
                file=sys.stderr,
            )
            return 1
        keyring = Keyring.generate()
        keyring.save(args.file)
        print(f"wrote keyring {args.file} with key {keyring.newest.key_id}")
        return 0
    try:
        if args.action == "rotate":
            return _keys_rotate(args.file, args.audit_log)
        if args.action == "retire":
            return _keys_retire(args.file, args.key_id, args.repository, args.audit_log)
        return _keys_list(args.file, args.repository)
    except KeyringError as exc:
        print(f"forseti keys {args.action}: {exc}", file=sys.stderr)
        return 1


def _keys_rotate(path: Path, audit_log: Path | None) -> int:
    from forseti.core.sealing.key_rotation import rotate_keyring

    key = rotate_keyring(path)
    if audit_log is not None:
        _audit_once(audit_log, "keys.rotate", keyring=str(path), new_key_id=key.key_id)
    print(f"added key {key.key_id} to {path}; it seals from now on, older keys still open")
    print(f"next: forseti reseal --keyring {path} REPOSITORY")
    return 0


def _keys_retire(path: Path, key_id: str, roots: list[Path], audit_log: Path | None) -> int:
    from forseti.core.sealing.key_rotation import retire_key

    remaining = retire_key(path, key_id, roots)
    if audit_log is not None:
        _audit_once(
            audit_log,
            "keys.retire",
            keyring=str(path),
            key_id=key_id,
            checked=[str(r) for r in roots],
        )
    print(f"retired key {key_id}; {path} now holds {len(remaining)} key(s)")
    return 0


def _keys_list(path: Path, roots: list[Path]) -> int:
    from forseti.core.sealing.key_rotation import scan_key_usage
    from forseti.core.sealing.keyring import Keyring

    ring = Keyring.load(path)
    counts = scan_key_usage(roots).counts() if roots else {}
    for key_id in ring.key_ids:
        key = ring.get(key_id)
        note = " (newest: seals)" if key_id == ring.newest.key_id else ""
        used = f"  {counts.get(key_id, 0)} sealed file(s)" if roots else ""
        print(f"{key_id}  created {key.created}{used}{note}")
    for key_id in sorted(set(counts) - set(ring.key_ids)):
        print(f"{key_id}  NOT IN KEYRING  {counts[key_id]} sealed file(s) cannot be opened")
    return 0


def _audit_once(path: Path, event: str, **fields: object) -> None:
    """Record one event in an audit log from a short-lived command."""
    from forseti.core.audit import AuditLog

    with AuditLog.open(path, component="cli") as audit:
        audit.record(event, **fields)


def main_seal(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="forseti seal",
        description=(
            "Seal every plaintext model file in a Triton model repository in place "
            "(AES-256-GCM, bound to model, version and file name) and remove the plaintext."
        ),
    )
    p.add_argument("--keyring", type=Path, required=True, help="keyring file (newest key seals)")
    p.add_argument("repository", type=Path)
    args = p.parse_args(argv)
    configure_logging("INFO")
    from forseti.core.sealing.keyring import KeyringError, load_keyring
    from forseti.core.sealing.seal_repository import SealRepositoryError, seal_repository

    try:
        keyring = load_keyring(args.keyring)
    except KeyringError as exc:
        print(f"forseti seal: {exc}", file=sys.stderr)
        return 2
    if not args.repository.is_dir():
        print(f"forseti seal: {args.repository} is not a folder", file=sys.stderr)
        return 2
    try:
        sealed = seal_repository(args.repository, keyring)
    except SealRepositoryError as exc:
        for problem in exc.problems:
            print(f"forseti seal: {problem}", file=sys.stderr)
        print(f"sealed {len(exc.sealed)} file(s); {len(exc.problems)} problem(s)")
        return 1
    print(
        f"sealed {len(sealed)} file(s) with key {keyring.newest.key_id}; wrote each model's "
        "manifest (its config and version folders as they are now)"
    )
    return 0


def main_reseal(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="forseti reseal",
        description=(
            "Re-encrypt every sealed artifact of a model repository whose key is not the "
            "keyring's newest, one file at a time and atomically, while servers keep serving "
            "from it (they read the old or the new file; both open while the keyring holds "
            "both keys)."
        ),
    )
    p.add_argument(
        "--keyring",
        type=Path,
        default=None,
        help="keyring file holding the newest key and the old ones (default: $FORSETI_KEYRING "
        "or $FORSETI_KEYRING_FD)",
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be resealed")
    p.add_argument("--audit-log", type=Path, metavar="PATH", help="record every resealed file")
    p.add_argument("repository", type=Path, nargs="+")
    args = p.parse_args(argv)
    configure_logging("WARNING")
    from forseti.core.audit import AuditError, AuditLog
    from forseti.core.sealing.keyring import KeyringError, load_keyring
    from forseti.core.sealing.reseal import ResealedFile, ResealError, reseal_repository

    try:
        keyring = load_keyring(args.keyring)
    except KeyringError as exc:
        print(f"forseti reseal: {exc}", file=sys.stderr)
        return 2
    try:
        audit = AuditLog.open(args.audit_log, component="reseal") if args.audit_log else None
    except AuditError as exc:
        print(f"forseti reseal: {exc}", file=sys.stderr)
        return 2
    newest = keyring.newest.key_id
    failed = False
    try:
        for repo in args.repository:

            def done(f: ResealedFile, repo: Path = repo) -> None:
                print(f"resealed {f.path.relative_to(repo)}  {f.from_key} -> {f.to_key}")
                if audit is not None:
                    audit.record(
                        "reseal.file",
                        repository=str(repo),
                        model=f.model,
                        version=f.version,
                        file=f.path.name,
                        from_key=f.from_key,
                        to_key=f.to_key,
                        old_sha256=f.old_sha256,
                        new_sha256=f.new_sha256,
                    )

            try:
                report = reseal_repository(repo, keyring, dry_run=args.dry_run, on_file=done)
            except ResealError as exc:
                print(f"forseti reseal: {exc}", file=sys.stderr)
                failed = True
                continue
            for path in report.pending:
                print(f"would reseal {path.relative_to(repo)}")
            for problem in report.problems:
                print(f"forseti reseal: {repo}: {problem}", file=sys.stderr)
            failed |= bool(report.problems)
            verb = "would reseal" if args.dry_run else "resealed"
            count = len(report.pending) if args.dry_run else len(report.resealed)
            print(
                f"{repo}: {verb} {count} file(s) to key {newest}; {report.current} already "
                f"on it; {len(report.problems)} problem(s)"
            )
            if report.manifests:
                print(f"{repo}: {verb} {len(report.manifests)} model manifest(s) to key {newest}")
    finally:
        if audit is not None:
            audit.close()
    return 1 if failed else 0


def main_audit(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="forseti audit",
        description="Check a Forseti audit log (hash-chained JSON lines).",
    )
    sub = p.add_subparsers(dest="action", required=True)
    verify = sub.add_parser(
        "verify",
        help="check the chain: prints OK and the head, or the first broken line (exit 1)",
        description=(
            "Check every line's seq and the SHA-256 link to the line before it. Prints OK with "
            "the line count and the head (SEQ:HASH); keep the head somewhere the log's writers "
            "cannot write and pass it back with --head to also catch removed last lines or a "
            "rewritten chain."
        ),
    )
    verify.add_argument("file", type=Path)
    verify.add_argument(
        "--head",
        metavar="SEQ:HASH",
        help="a head printed by an earlier verify: the log must still hold it unchanged",
    )
    args = p.parse_args(argv)
    from forseti.core.audit import AuditError, parse_head, verify_file

    try:
        head = parse_head(args.head) if args.head else None
    except ValueError as exc:
        print(f"forseti audit verify: --head: {exc}", file=sys.stderr)
        return 2
    try:
        result = verify_file(args.file, head)
    except AuditError as exc:
        print(f"forseti audit verify: {exc}", file=sys.stderr)
        return 2
    if not result.ok:
        print(f"BROKEN at line {result.broken_line}: {result.reason}")
        print(f"lines 1-{result.lines} verify; the chain up to there ends at {result.head}")
        return 1
    print(f"OK: {result.lines} lines, chain intact; head {result.head}")
    for line_no in result.recovered_tears:
        print(f"note: line {line_no} is a torn line left by a killed writer, recorded after it")
    return 0


def main_publish(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="forseti publish",
        description=(
            "Seal plaintext model files and publish them as the next version of MODEL, on a "
            "local folder or an object store (s3://bucket/prefix, s3://host:port/bucket/prefix; "
            "credentials and endpoint from the AWS environment). The version's files are "
            "written first and the model manifest last, so servers never see half a version "
            "and two publishers never take the same number. Prints the version number."
        ),
    )
    p.add_argument(
        "--keyring",
        type=Path,
        default=None,
        help="keyring file (default: $FORSETI_KEYRING or $FORSETI_KEYRING_FD); newest key seals",
    )
    p.add_argument("--model-repository", required=True, metavar="REPO", help="folder or URL")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="config.pbtxt to publish with this version (default: the model's current one, "
        "which its manifest must authenticate)",
    )
    p.add_argument("--audit-log", type=Path, metavar="PATH", help="record the publication")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("files", type=Path, nargs="+", metavar="FILE", help="plaintext model files")
    args = p.parse_args(argv)
    configure_logging("WARNING")
    from forseti.core.repository.manifest import ManifestError
    from forseti.core.repository.publish import PublishError, publish_model_version
    from forseti.core.sealing.keyring import KeyringError, load_keyring
    from forseti.core.sealing.sealed import SealError
    from forseti.core.storage import StorageError, open_storage

    try:
        keyring = load_keyring(args.keyring)
    except KeyringError as exc:
        print(f"forseti publish: {exc}", file=sys.stderr)
        return 2
    names = [f.name for f in args.files]
    if len(set(names)) != len(names):
        print("forseti publish: two files have the same name", file=sys.stderr)
        return 2
    try:
        artifacts = {f.name: f.read_bytes() for f in args.files}
        config = args.config.read_bytes() if args.config is not None else None
    except OSError as exc:
        print(f"forseti publish: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        published = publish_model_version(
            open_storage(args.model_repository),
            args.model,
            artifacts,
            keyring=keyring,
            config_text=config,
        )
    except (PublishError, ManifestError, SealError, StorageError) as exc:
        print(f"forseti publish: {exc}", file=sys.stderr)
        return 1
    if args.audit_log is not None:
        _audit_once(
            args.audit_log,
            "model.publish",
            repository=args.model_repository,
            model=args.model,
            version=published.version,
            manifest_serial=published.serial,
            files=sorted(artifacts),
        )
    print(published.version)
    return 0


def main_rollback(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="forseti rollback",
        description=(
            "Serve an earlier committed version of MODEL: writes a new model manifest (higher "
            "serial) pinned to VERSION. Servers in poll mode serve it at their next poll, "
            "explicit ones at their next load of the model. --unpin returns the model to its "
            "config's version_policy. The next publish clears the pin."
        ),
    )
    p.add_argument("--keyring", type=Path, default=None, help="keyring file (default: environment)")
    p.add_argument("--model-repository", required=True, metavar="REPO", help="folder or URL")
    p.add_argument("--audit-log", type=Path, metavar="PATH", help="record the rollback")
    p.add_argument("--unpin", action="store_true", help="remove the pin instead")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("version", metavar="VERSION", nargs="?", help="a committed version number")
    args = p.parse_args(argv)
    configure_logging("WARNING")
    if args.unpin == (args.version is not None):
        p.error("give either VERSION or --unpin")
    from forseti.core.repository.layout import parse_version_name
    from forseti.core.repository.manifest import (
        ManifestError,
        ModelManifest,
        commit_manifest,
        pinned,
    )
    from forseti.core.sealing.keyring import KeyringError, load_keyring
    from forseti.core.storage import StorageError, open_storage

    version = None
    if args.version is not None:
        version = parse_version_name(args.version)
        if version is None:
            p.error(f"VERSION must be a version number, got {args.version!r}")
    try:
        keyring = load_keyring(args.keyring)
    except KeyringError as exc:
        print(f"forseti rollback: {exc}", file=sys.stderr)
        return 2
    before: list[tuple[int, ...] | None] = []

    def change(current: ModelManifest | None) -> ModelManifest:
        if current is None:
            raise ManifestError(f"{args.model} has no model manifest: nothing to roll back")
        before.append(current.pin)
        return pinned(current, None if version is None else [version], "rollback")

    try:
        written = commit_manifest(open_storage(args.model_repository), args.model, keyring, change)
    except (ManifestError, StorageError) as exc:
        print(f"forseti rollback: {exc}", file=sys.stderr)
        return 1
    previous = before[-1] if before else None
    if args.audit_log is not None:
        _audit_once(
            args.audit_log,
            "model.rollback",
            repository=args.model_repository,
            model=args.model,
            pin=list(written.pin) if written.pin is not None else None,
            previous_pin=list(previous) if previous is not None else None,
            manifest_serial=written.serial,
        )
    if written.pin is None:
        print(f"{args.model}: unpinned (manifest serial {written.serial})")
    else:
        print(
            f"{args.model}: pinned to version {version} (manifest serial {written.serial}); "
            "servers in poll mode serve it at their next poll, explicit ones at their next load"
        )
    return 0
