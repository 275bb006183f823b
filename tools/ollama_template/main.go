// qatforge-gotemplate: executes Ollama-style Modelfile TEMPLATEs with Go's own text/template.
//
// Input on stdin, one JSON object:
//
//	{"template": "...", "messages": [{"role": "...", "content": "..."}, ...]}
//	{"cases": [{"template": ..., "messages": ...}, ...]}
//
// Output on stdout: {"output": "..."} or {"error": "..."} for a single case, a JSON list of those
// for "cases". Template parse and execution errors are reported in "error" (exit status 0); the
// exit status is 1 only for unreadable input. The template sees the data Ollama gives a TEMPLATE:
// .Messages (each with .Role and .Content) plus the empty strings .System, .Prompt, .Response.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Data struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
}

type Case struct {
	Template *string   `json:"template"`
	Messages []Message `json:"messages"`
}

type Input struct {
	Case
	Cases []Case `json:"cases"`
}

type Result struct {
	Output *string `json:"output,omitempty"`
	Error  *string `json:"error,omitempty"`
}

var parsed = map[string]*template.Template{}

func run(c Case) Result {
	fail := func(err error) Result { msg := err.Error(); return Result{Error: &msg} }
	if c.Template == nil {
		return fail(fmt.Errorf("case has no \"template\""))
	}
	tmpl, ok := parsed[*c.Template]
	if !ok {
		var err error
		tmpl, err = template.New("TEMPLATE").Option("missingkey=error").Parse(*c.Template)
		if err != nil {
			return fail(err)
		}
		parsed[*c.Template] = tmpl
	}
	messages := c.Messages
	if messages == nil {
		messages = []Message{}
	}
	var out bytes.Buffer
	if err := tmpl.Execute(&out, Data{Messages: messages}); err != nil {
		return fail(err)
	}
	s := out.String()
	return Result{Output: &s}
}

func main() {
	var in Input
	dec := json.NewDecoder(os.Stdin)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "qatforge-gotemplate: bad input:", err)
		os.Exit(1)
	}
	var result interface{}
	if in.Cases != nil {
		results := make([]Result, len(in.Cases))
		for i, c := range in.Cases {
			results[i] = run(c)
		}
		result = results
	} else {
		result = run(in.Case)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(result); err != nil {
		fmt.Fprintln(os.Stderr, "qatforge-gotemplate:", err)
		os.Exit(1)
	}
}
