package envoyconfig

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// validator is what protoc-gen-validate generates for every Envoy message.
type validator interface {
	ValidateAll() error
}

// Validate runs m's own validation rules and, since those stop at an Any,
// unpacks every Any inside m and validates its content the same way. An
// Any whose type is not linked into the binary is an error: Envoy would
// not know the extension either.
func Validate(m proto.Message) error {
	if err := validate(m, string(m.ProtoReflect().Descriptor().FullName())); err != nil {
		return fmt.Errorf("envoyconfig: %w", err)
	}
	return nil
}

func validate(m proto.Message, path string) error {
	var errs []error
	if v, ok := m.(validator); ok {
		if err := v.ValidateAll(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", path, err))
		}
	}
	walkAnys(m.ProtoReflect(), path, func(a *anypb.Any, at string) {
		inner, err := anypb.UnmarshalNew(a, proto.UnmarshalOptions{})
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: type %s: %w", at, a.GetTypeUrl(), err))
			return
		}
		if err := validate(inner, at); err != nil {
			errs = append(errs, err)
		}
	})
	return errors.Join(errs...)
}

// walkAnys calls f for every Any in m, not descending into them.
func walkAnys(m protoreflect.Message, path string, f func(*anypb.Any, string)) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		at := path + "." + string(fd.Name())
		switch {
		case fd.IsMap():
			if fd.MapValue().Message() == nil {
				return true
			}
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				visit(mv.Message(), fmt.Sprintf("%s[%s]", at, k.String()), f)
				return true
			})
		case fd.IsList():
			if fd.Message() == nil {
				return true
			}
			for i := range v.List().Len() {
				visit(v.List().Get(i).Message(), fmt.Sprintf("%s[%d]", at, i), f)
			}
		case fd.Message() != nil:
			visit(v.Message(), at, f)
		}
		return true
	})
}

func visit(m protoreflect.Message, path string, f func(*anypb.Any, string)) {
	if a, ok := m.Interface().(*anypb.Any); ok {
		f(a, path)
		return
	}
	walkAnys(m, path, f)
}
