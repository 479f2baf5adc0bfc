"""The model code that `loopedlm export` copies verbatim into an exported folder. These files
import only torch and transformers (never loopedlm): they run wherever the folder goes."""
