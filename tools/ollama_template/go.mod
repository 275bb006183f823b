module qatforge/ollama_template

go 1.16
