"""Model pieces that more than one paper uses (Linformer attention, low-rank linear layers, ...). A paper's
package may import from here; nothing here imports a paper's package."""
