"""Prompt files for sampling and evaluation: UTF-8 text, one prompt per line."""


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file; an error that names the file when there are none."""
    try:
        with open(path, encoding='utf-8') as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f'cannot read prompts file {path}: {e}') from e
    if not prompts:
        raise SystemExit(f'prompts file {path} has no prompts: write one prompt per line')
    return prompts
