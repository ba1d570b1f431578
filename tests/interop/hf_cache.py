"""huggingface_hub against lmx's cache, driven by tests/downloads_interop.rs.

  hf_cache.py find CACHE REPO REVISION   snapshot_download(local_files_only=True) + scan_cache_dir
  hf_cache.py pull CACHE REPO ENDPOINT   snapshot_download from a hub endpoint

Prints one JSON object.
"""

import json
import sys

from huggingface_hub import scan_cache_dir, snapshot_download


def main() -> None:
    command, cache, repo, arg = sys.argv[1:5]
    if command == "find":
        path = snapshot_download(repo, revision=arg, cache_dir=cache, local_files_only=True)
        info = scan_cache_dir(cache)
        repos = [
            {
                "repo_id": r.repo_id,
                "size_on_disk": r.size_on_disk,
                "revisions": sorted(rev.commit_hash for rev in r.revisions),
                "refs": sorted(ref for rev in r.revisions for ref in rev.refs),
                "files": sorted(f.file_name for rev in r.revisions for f in rev.files),
            }
            for r in info.repos
        ]
        print(json.dumps({"path": path, "repos": repos, "warnings": [str(w) for w in info.warnings]}))
    elif command == "pull":
        path = snapshot_download(repo, cache_dir=cache, endpoint=arg)
        print(json.dumps({"path": path}))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
